"""The quantize annotation: the typed contract between the quantize pass and everything after it.

The quantize pass leaves one `LayerAnnotation` on each quantized MatMul and Conv (its resolved
weight and activation specs, how the weight is stored, where the float activation
comes from, its weight SQNR). Backends lower from it, `qcompile eval` and the manifest
read it back. It travels inside the model as JSON in the node's metadata entry
``qcompiler.quant`` (so it survives ``model.onnx`` on disk), written and read only here:
a renamed field fails at one place, loudly, instead of silently in two backends.

``schema`` versions the JSON layout. Annotations without the field were written before
it existed, in the layout of version 1.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import onnx_ir as ir

from qcompiler.errors import QCompilerError
from qcompiler.quant.presets import Scheme
from qcompiler.quant.spec import QuantSpec

KEY = "qcompiler.quant"
SCHEMA = 1


@dataclass(frozen=True)
class WeightAnnotation:
    """How a linear's weight was quantized and is stored."""

    spec: QuantSpec
    quantizer: str
    # DequantizeLinear(codes, scale[, zero]) in the graph; otherwise float32 values exactly on the grid.
    native: bool
    tensor_scale: float | None = None


@dataclass(frozen=True)
class ActivationAnnotation:
    """How a linear's input is quantized: the spec, the static range, and the float value it is computed from."""

    spec: QuantSpec
    range: tuple[float, float] | None = None
    source: str | None = None

    @property
    def int8_per_token(self) -> bool:
        """Symmetric int8 per token: what the backends' integer kernels take."""
        s = self.spec
        return s.format == "int8" and s.dynamic and s.granularity == "token" and s.symmetric

    @property
    def int8_static_tensor(self) -> bool:
        """int8 per tensor with a range fixed at calibration: the Q/DQ pair integer kernels fuse."""
        s = self.spec
        return s.format == "int8" and not s.dynamic and s.granularity == "tensor"


@dataclass(frozen=True)
class LayerAnnotation:
    """What the quantize pass decided for one linear, as every later stage reads it."""

    layer: str  # module path, e.g. encoder.layer.3.output.dense
    preset: str
    weight: WeightAnnotation
    activation: ActivationAnnotation | None
    weight_sqnr_db: float
    # A convolution that also quantizes its output (same spec as its input) keeps that range here.
    output_range: tuple[float, float] | None = None

    @property
    def scheme(self) -> Scheme:
        return Scheme(self.weight.spec, self.activation.spec if self.activation else None)

    def with_activation(self, bounds: tuple[float, float] | None, source: str) -> "LayerAnnotation":
        """The annotation once the activation quantizer is in place: its static range and float source."""
        if self.activation is None:
            raise ValueError(f"{self.layer} has no activation spec to give a range")
        range_ = None if bounds is None else (float(bounds[0]), float(bounds[1]))
        return dataclasses.replace(self, activation=dataclasses.replace(self.activation, range=range_, source=source))

    def with_output(self, bounds: tuple[float, float]) -> "LayerAnnotation":
        """The annotation once the layer's output is quantized too, with that static range."""
        return dataclasses.replace(self, output_range=(float(bounds[0]), float(bounds[1])))

    def to_node(self, node: ir.Node) -> None:
        """Store the annotation on ``node`` (replacing any earlier one)."""
        node.metadata_props[KEY] = json.dumps(self._to_json())

    @classmethod
    def from_node(cls, node: ir.Node) -> "LayerAnnotation | None":
        """The annotation on ``node``, or None when it has none."""
        text = node.metadata_props.get(KEY)
        if text is None:
            return None
        try:
            data = json.loads(text)
            schema = data.get("schema", 1)
            if schema != SCHEMA:
                raise QCompilerError(f"Node '{node.name}' carries a qcompiler annotation of schema {schema}; this "
                                     f"qcompiler reads schema {SCHEMA}: compile the model again with this version.")
            return cls._from_json(data)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise QCompilerError(f"The qcompiler annotation on node '{node.name}' is malformed ({exc}); "
                                 "the model was edited after it was compiled.") from None

    def _to_json(self) -> dict:
        weight = self.weight
        activation = None
        if self.activation is not None:
            a = self.activation
            activation = {"spec": a.spec.describe(), **a.spec.to_dict(),
                          "range": None if a.range is None else list(a.range), "source": a.source}
        return {
            "schema": SCHEMA,
            "layer": self.layer,
            "preset": self.preset,
            "scheme": self.scheme.describe(),
            "weight_sqnr_db": self.weight_sqnr_db,
            "weight": {"spec": weight.spec.describe(), "quantizer": weight.quantizer, **weight.spec.to_dict(),
                       "stored": "DequantizeLinear" if weight.native else "pre-dequantized float32",
                       "tensor_scale": weight.tensor_scale},
            "activation": activation,
            "output_range": None if self.output_range is None else list(self.output_range),
        }

    @classmethod
    def _from_json(cls, data: dict) -> "LayerAnnotation":
        w = data["weight"]
        weight = WeightAnnotation(_spec(w), w["quantizer"], w["stored"] == "DequantizeLinear", w.get("tensor_scale"))
        a = data["activation"]
        activation = None
        if a is not None:
            bounds = a.get("range")
            activation = ActivationAnnotation(_spec(a), None if bounds is None else (float(bounds[0]), float(bounds[1])),
                                              a.get("source"))
        output = data.get("output_range")
        return cls(data["layer"], data["preset"], weight, activation, float(data["weight_sqnr_db"]),
                   None if output is None else (float(output[0]), float(output[1])))


def _spec(data: dict) -> QuantSpec:
    return QuantSpec(**{f.name: data[f.name] for f in dataclasses.fields(QuantSpec)})


def annotated_layers(model: ir.Model) -> list[tuple[ir.Node, LayerAnnotation]]:
    """Every annotated node of ``model``'s graph with its annotation, in graph order."""
    found = []
    for node in model.graph:
        annotation = LayerAnnotation.from_node(node)
        if annotation is not None:
            found.append((node, annotation))
    return found
