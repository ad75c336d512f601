"""The error a transform search minimises over a convolution region: its sinks' outputs once quantized.

`qcompiler.quant.proxy` scores linears on token rows; a convolution's output at a pixel
depends on a neighbourhood of input pixels, so it is scored on whole calibration samples
instead: each sink's Conv (its own strides, pads, dilations and groups, run by
onnxruntime) on ``Q((x - z) / s)`` and ``Q(s W)`` against the same Conv in float. The
shift's ``W z`` goes to the bias in float and adds no error of its own. Activations are
quantized along the channel axis, one "token" per pixel, as the quantize pass does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qcompiler.analysis.conv_regions import ConvRegion
from qcompiler.analysis.convolutions import Convolution
from qcompiler.analysis.linears import constant_array
from qcompiler.conv_absorb import input_channel_view
from qcompiler.quant.presets import Scheme
from qcompiler.quant.proxy import PROXY_SCHEME
from qcompiler.quant.spec import fake_quant
from qcompiler.runtime import make_session


@dataclass
class ConvSample:
    """A few calibration samples of one sink's input, the sink, and a session running its Conv alone."""

    x: np.ndarray  # [n, C, spatial...]
    conv: Convolution
    weight: np.ndarray
    session: ort.InferenceSession
    scheme: Scheme = PROXY_SCHEME

    def run(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": x.astype(np.float32), "w": weight.astype(np.float32)})[0]


def conv_region_samples(region: ConvRegion, examples: dict[str, np.ndarray],
                        target: Scheme | None = None) -> list[ConvSample]:
    """Each sink's input samples, kernel and a one-Conv session, scored under ``target`` (else the int8 proxy)."""
    return [ConvSample(examples[sink.input.name], sink, constant_array(sink.node.inputs[1]),
                       _conv_session(sink), target or PROXY_SCHEME) for sink in region.sinks]


def conv_region_error(samples: list[ConvSample], scale: np.ndarray | None = None,
                      shift: np.ndarray | None = None) -> float:
    """Quantized output error of every sink once the region reads ``(x - z) / s`` (``W' = s W`` per input channel)."""
    total = 0.0
    for sample in samples:
        x, weight = sample.x.astype(np.float64), sample.weight.astype(np.float64)
        channel_view = (1, -1) + (1,) * (x.ndim - 2)
        if shift is not None:
            x = x - shift.reshape(channel_view)
        if scale is not None:
            x = x / scale.reshape(channel_view)
            weight = weight * input_channel_view(sample.conv, scale)
        exact = sample.run(x, weight)
        total += float(np.sum(np.square(sample.run(_quantize_input(x, sample.scheme),
                                                   _quantize_kernel(sample.conv, weight, sample.scheme)) - exact,
                                        dtype=np.float64)))
    return total


def _quantize_input(x: np.ndarray, scheme: Scheme) -> np.ndarray:
    if scheme.activation is None:
        return x
    channels_last = np.moveaxis(x, 1, -1).astype(np.float32)
    return np.moveaxis(fake_quant(channels_last, scheme.activation, "activation"), -1, 1)


def _quantize_kernel(conv: Convolution, weight: np.ndarray, scheme: Scheme) -> np.ndarray:
    matrix = conv.as_matrix(weight.astype(np.float32))
    return conv.from_matrix(fake_quant(matrix, scheme.weight, "weight"))


def _conv_session(conv: Convolution) -> ort.InferenceSession:
    """The sink's Conv, kernel as an input, as a model of its own."""
    rank = len(conv.kernel_shape)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([None] * rank))
    w = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(conv.kernel_shape)))
    attributes = {name: attr.value for name, attr in conv.node.attributes.items()}
    node = ir.node("Conv", [x, w], attributes=attributes, name="conv")
    node.outputs[0].name = "y"
    graph = ir.Graph([x, w], node.outputs, nodes=[node], opset_imports={"": 23}, name="conv")
    return make_session(ir.Model(graph, ir_version=11))
