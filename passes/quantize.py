"""quantize: give every linear a weight and activation spec, quantize its weight, fix ranges.

One pass per preset (``w8a8``, ``w8a8-dyn``, ``w8a16``, ``w4a16``, ``w4a8``, ``w4a4``, ``fp8``,
``mxfp8``, ``mxfp4``, ``nvfp4``), plus ``quantize(preset=...)``. Per-layer choices go by glob
on the layer's module path (``encoder.layer.3.output.dense``), node name or weight name: ``skip=*pooler*`` keeps those linears float,
``override=*output.dense*:w8a8`` gives them another preset (several with ``;``).
``fallback=0.25`` keeps up to that share of the linears' weight parameters at
``fallback_preset`` (default ``w8a16`` for weight-only presets, else ``w8a8-dyn``),
filled with the linears whose round-to-nearest weights move the model's outputs most per
parameter on calibration data (`qcompiler.quant.sensitivity`). The ``Q^T``
MatMuls that ``rotate`` inserts in front of graph outputs stay float.

The weight quantizer is ``rtn``, ``mse`` (clipping search), ``gptq`` (``X^T X`` of each
linear's input from calibration, by default as the already-quantized layers before it
produce it, as GPTQ does; ``act_order``, ``damp``, ``sequential``; ``scales=mse`` fits its
group scales by clipping search, ``refine`` adds coordinate-descent sweeps over its rounding)
or ``awq`` (activation-aware scales absorbed by each region's producer, then output-error clipping) or ``awq-gptq``
(AWQ's scales, then GPTQ's rounding). Static activation
ranges come from the observer (``minmax``, ``percentile``, ``mse``).

The result is the simulate form (`qcompiler.quant.simulate`): a QDQ graph onnxruntime runs,
with the resolved specs on each MatMul as the ``qcompiler.quant`` metadata entry, which is
what backends lower from.
"""

from __future__ import annotations

import collections
import fnmatch
from dataclasses import dataclass, field, make_dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.linears import Linear, constant_array, find_linears
from qcompiler.errors import QCompilerError
from qcompiler.pass_api import Pass, PassContext, PassOutcome
from qcompiler.quant import awq, weights
from qcompiler.quant.annotation import ActivationAnnotation, LayerAnnotation, WeightAnnotation
from qcompiler.quant.observers import observe_range
from qcompiler.quant.presets import PRESETS, Scheme, preset_scheme
from qcompiler.quant.sensitivity import SensitivityRow, output_sensitivity
from qcompiler.quant.simulate import dequantized_weight, per_consumer, quantized_activation, weight_is_native
from qcompiler.quant.spec import sqnr_db
from qcompiler.registry import register
from qcompiler.stream_rewrite import UNROTATE

# Calibration batches (evenly spread) that fallback's ranking runs on: one model run per
# batch per linear. On MiniLM the top 8 of 37 linears are the same as with all 48 batches.
SENSITIVITY_BATCHES = 8


@dataclass
class QuantizeOptions:
    preset: str = "w8a8"
    weights: Literal["rtn", "mse", "gptq", "awq", "awq-gptq"] = "rtn"
    observer: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = 99.99
    group_size: int | None = None
    act_order: bool = False
    damp: float = 0.01
    sequential: bool = False
    scales: Literal["minmax", "mse"] = "minmax"
    refine: int = 0
    grid: int = 20
    rows: int = 512
    skip: tuple[str, ...] = ()
    override: tuple[str, ...] = ()
    fallback: float = 0.0
    fallback_preset: str = ""

    def __post_init__(self) -> None:
        preset_scheme(self.preset)
        for item in self.override:
            pattern, _, preset = item.rpartition(":")
            if not pattern:
                raise ValueError(f"override '{item}' must be written glob:preset, e.g. *output.dense*:w8a8")
            preset_scheme(preset)
        if not 0 <= self.fallback <= 1:
            raise ValueError(f"fallback is the share of weight parameters kept at higher precision, in [0, 1], "
                             f"not {self.fallback}")
        if self.fallback and preset_scheme(self.preset).weight.element.bits >= 8:
            raise ValueError(f"fallback ranks linears by the damage of rounding their weights below 8 bits; "
                             f"{self.preset} already stores 8-bit weights")
        if self.fallback_preset:
            preset_scheme(self.fallback_preset)
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must lie in (0, 100], not {self.percentile}")
        if self.group_size is not None and self.group_size < 0:
            raise ValueError(f"group_size must be 0 (per channel) or positive, not {self.group_size}")
        if self.damp <= 0 or self.grid < 1 or self.rows < 1:
            raise ValueError("damp, grid and rows must be positive")
        if self.refine < 0:
            raise ValueError(f"refine counts coordinate-descent sweeps and must be 0 or more, not {self.refine}")
        if (self.scales != "minmax" or self.refine) and self.weights not in ("gptq", "awq-gptq"):
            raise ValueError(f"scales and refine tune GPTQ (weights=gptq or awq-gptq), not weights={self.weights}")


@dataclass
class LayerPlan:
    linear: Linear
    scheme: Scheme
    preset: str


class Quantize(Pass):
    name = "quantize"
    summary = "Quantize every linear under a preset (w8a8, w4a16, ...), with per-layer overrides and a skip list."
    Options = QuantizeOptions
    preserves_function = False

    def scheme(self, preset: str | None = None) -> Scheme:
        """The resolved scheme of ``preset`` (default: this pass's) under the pass's options."""
        return preset_scheme(preset or self.options.preset).with_options(self.options.group_size, self.options.observer)

    def optimizes_for(self) -> Scheme:
        """Searches before quantization (smooth, shift) score against the scheme most linears will get."""
        return self.scheme()

    def plan(self, graph: ir.Graph) -> tuple[list[LayerPlan], list[str]]:
        """Which linears get which scheme, and which are skipped."""
        plans, skipped = [], []
        for linear in find_linears(graph):
            if LayerAnnotation.from_node(linear.matmul) is not None:
                continue  # quantized by an earlier pass (a pre-dequantized grid still looks like a linear)
            if UNROTATE in linear.matmul.metadata_props:
                # rotate's exact Q^T in front of a graph output or a kept norm: it carries no learned weight,
                # and rounding it would add error the unrotated model never had.
                skipped.append(f"{linear.matmul.name} (rotate's Q^T compensation)")
                continue
            names = (linear.layer, linear.matmul.name or "", linear.weight.name or "")
            if any(fnmatch.fnmatchcase(n, glob) for glob in self.options.skip for n in names):
                skipped.append(linear.layer)
                continue
            preset = self.options.preset
            for item in self.options.override:
                glob, _, other = item.rpartition(":")
                if any(fnmatch.fnmatchcase(n, glob) for n in names):
                    preset = other
                    break
            plans.append(LayerPlan(linear, self.scheme(preset), preset))
        return plans, skipped

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        graph = model.graph
        options = self.options
        plans, skipped = self.plan(graph)
        if not plans and not any(LayerAnnotation.from_node(node) for node in graph):
            raise QCompilerError(_nothing_to_quantize(graph, self.name, skipped))
        details: dict = {"scheme": self.scheme().describe(), "skipped": skipped, "notes": []}
        if options.weights in ("awq", "awq-gptq"):
            found = awq.search_and_absorb(model, ctx, {id(p.linear.matmul): p.scheme for p in plans},
                                          options.grid, options.rows)
            details["awq_alpha"], details["notes"] = found["scaled"], found["notes"]
            plans = self._refresh(graph, plans)
        ranking: list[SensitivityRow] = []
        if options.fallback and plans:
            plans, ranking = self._fall_back(model, ctx, plans)
        inputs = list(dict.fromkeys(p.linear.input.name for p in plans))
        static = [n for n in inputs if any(p.linear.input.name == n and p.scheme.activation is not None
                                           and not p.scheme.activation.dynamic for p in plans)]
        stats = ctx.statistics(model, static) if static else {}
        rows = ctx.samples(model, inputs, options.rows) if options.weights == "awq" and inputs else {}
        uses_gptq = options.weights in ("gptq", "awq-gptq")
        hessians = {}
        if uses_gptq and not options.sequential:
            hessians = {n: s.xtx for n, s in ctx.statistics(model, inputs, xtx=inputs).items()}

        layers = []
        for name in inputs:
            if uses_gptq and options.sequential:
                # The input as the layers before it, already quantized, produce it (GPTQ's order).
                hessians = {name: ctx.statistics(model, [name], xtx=[name])[name].xtx}
            for plan in plans:
                if plan.linear.input.name == name:
                    layers.append(self._quantize_weight(graph, plan, hessians, rows))
        for name in inputs:
            self._quantize_input(graph, [p for p in plans if p.linear.input.name == name], stats)
        unrefined = sorted({p.scheme.weight.describe() for p in plans if p.scheme.weight.element.kind != "int"})
        if uses_gptq and options.refine and unrefined:
            details["notes"].append(f"refine moves integer codes; {', '.join(unrefined)} weights keep GPTQ's rounding")
        pre_dequantized = sorted({layer["weight"] for layer in layers if not layer["native"]})
        if pre_dequantized:
            details["notes"].append(
                f"onnxruntime has no DequantizeLinear kernel for {', '.join(pre_dequantized)} weights: those are stored "
                "pre-dequantized (float32 values exactly on the quantized grid), so fidelity is exact but size is not")
        details["layers"] = layers
        return PassOutcome(bool(plans), details, findings=ranking)

    def fallback_preset(self) -> str:
        """The preset of the linears ``fallback`` moves: 8-bit weights, activations as the main preset treats them."""
        if self.options.fallback_preset:
            return self.options.fallback_preset
        return "w8a16" if self.scheme().activation is None else "w8a8-dyn"

    def _fall_back(self, model: ir.Model, ctx: PassContext,
                   plans: list[LayerPlan]) -> tuple[list[LayerPlan], list[SensitivityRow]]:
        """Move the linears that buy the most fidelity per byte to the fallback preset, up to the ``fallback`` share.

        Each linear is scored alone with round-to-nearest weights under its own scheme: the
        ranking needs the relative damage of each layer, not the final quantizer's figure,
        and RTN keeps the search to one model run per batch per linear. Linears are taken in
        order of damage per parameter while they fit the budget: on MiniLM that beats
        taking the most damaging linears first at equal bytes (0.9967 against 0.9950), as
        small value projections come before large FFN matrices. Linears an ``override``
        placed keep the user's preset and are not ranked.
        """
        candidates = [p for p in plans if p.preset == self.options.preset]
        trials = {}
        for plan in candidates:
            weight = constant_array(plan.linear.weight).astype(np.float32)
            trials[plan.linear.weight.name] = weights.rtn(weight, plan.scheme.weight).dequantize()
        batches = ctx.batches()
        spread = batches[::max(1, len(batches) // SENSITIVITY_BATCHES)][:SENSITIVITY_BATCHES]
        scores = output_sensitivity(model, trials, spread)
        size = {id(p.linear.matmul): trials[p.linear.weight.name].size for p in candidates}
        ranked = sorted(candidates, key=lambda p: scores[p.linear.weight.name] / size[id(p.linear.matmul)],
                        reverse=True)
        budget = self.options.fallback * sum(size.values())
        chosen, spent = set(), 0
        for plan in ranked:
            if spent + size[id(plan.linear.matmul)] <= budget:
                chosen.add(id(plan.linear.matmul))
                spent += size[id(plan.linear.matmul)]
        preset = self.fallback_preset()
        moved = [LayerPlan(p.linear, self.scheme(preset), preset) if id(p.linear.matmul) in chosen else p
                 for p in plans]
        table = [SensitivityRow(p.linear.layer, scores[p.linear.weight.name], size[id(p.linear.matmul)],
                                preset if id(p.linear.matmul) in chosen else p.preset) for p in ranked]
        return moved, table

    def _refresh(self, graph: ir.Graph, plans: list[LayerPlan]) -> list[LayerPlan]:
        """Linears again after AWQ rewrote weights (a copied weight is a new value)."""
        current = {id(linear.matmul): linear for linear in find_linears(graph)}
        return [LayerPlan(current[id(p.linear.matmul)], p.scheme, p.preset) for p in plans]

    def _quantize_weight(self, graph: ir.Graph, plan: LayerPlan, hessians: dict, rows: dict) -> dict:
        linear, spec = plan.linear, plan.scheme.weight
        weight = constant_array(linear.weight).astype(np.float32)
        method = self.options.weights
        if method in ("gptq", "awq-gptq"):
            hessian = hessians[linear.input.name]
            clip = weights.clip_ratios(weight, spec, grid=self.options.grid) if self.options.scales == "mse" else 1.0
            quantized = weights.gptq(weight, hessian, spec, damp=self.options.damp, act_order=self.options.act_order,
                                     clip=clip)
            if self.options.refine and spec.element.kind == "int":
                quantized = weights.refine(weight, quantized, hessian, damp=self.options.damp,
                                           sweeps=self.options.refine)
        elif method == "awq":
            quantized = weights.clip_search(weight, spec, weights.output_error(rows[linear.input.name]),
                                            self.options.grid)
        elif method == "mse":
            quantized = weights.mse(weight, spec, self.options.grid)
        else:
            quantized = weights.rtn(weight, spec)
        old = linear.weight
        linear.matmul.replace_input_with(1, dequantized_weight(graph, quantized, _base_name(linear), linear.matmul))
        if old.is_initializer() and not old.uses():
            graph.initializers.pop(old.name)
        weight_sqnr = round(sqnr_db(weight, quantized.dequantize()), 2)
        activation = plan.scheme.activation
        LayerAnnotation(linear.layer, plan.preset,
                        WeightAnnotation(spec, method, weight_is_native(spec), quantized.tensor_scale),
                        None if activation is None else ActivationAnnotation(activation),
                        weight_sqnr).to_node(linear.matmul)
        return {"linear": linear.layer, "preset": plan.preset, "weight": spec.describe(),
                "activation": activation.describe() if activation else "float",
                "quantizer": method, "weight_sqnr_db": weight_sqnr, "native": weight_is_native(spec)}

    def _quantize_input(self, graph: ir.Graph, plans: list[LayerPlan], stats: dict) -> None:
        """One quantize-dequantize per distinct activation spec of the linears sharing an input."""
        by_spec: dict = {}
        for plan in plans:
            if plan.scheme.activation is not None:
                by_spec.setdefault(plan.scheme.activation, []).append(plan)
        for spec, group in by_spec.items():
            source = group[0].linear.input
            bounds = None
            if not spec.dynamic:
                bounds = observe_range(stats[source.name], spec, self.options.percentile)
            quantized = quantized_activation(graph, source, spec, bounds, group[0].linear.in_features)
            for plan, value in zip(group, per_consumer(graph, quantized, len(group))):
                plan.linear.matmul.replace_input_with(0, value)
                annotation = LayerAnnotation.from_node(plan.linear.matmul)
                annotation.with_activation(bounds, source.name).to_node(plan.linear.matmul)


def _nothing_to_quantize(graph: ir.Graph, preset: str, skipped: list[str]) -> str:
    """One sentence on why a quantize pass found no linear: an artifact identical to FP32 is no success."""
    if skipped:
        return f"Preset '{preset}' has no linear left to quantize: all {len(skipped)} were skipped ({skipped[0]}, ...)."
    heavy = collections.Counter(node.op_type for node in graph
                                if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum"))
    found = ", ".join(f"{op} x{count}" for op, count in heavy.most_common()) or "none"
    return (f"Preset '{preset}' found no linear layer to quantize (a MatMul or Gemm with a constant 2-D weight); "
            f"the model's matrix and convolution ops are: {found}, and qcompiler does not quantize convolutions yet.")


def _base_name(linear: Linear) -> str:
    return linear.weight.name or linear.matmul.name or "weight"


def _preset_pass(preset: str, summary: str) -> type[Pass]:
    options = make_dataclass(f"{preset.title().replace('-', '')}Options",
                             [("preset", str, field(default=preset))], bases=(QuantizeOptions,))
    return type(f"Quantize{preset.title().replace('-', '')}", (Quantize,),
                {"name": preset, "summary": f"Quantize: {summary}.", "Options": options})


register(Quantize)
for _name, (_scheme, _summary) in PRESETS.items():
    register(_preset_pass(_name, _summary))
