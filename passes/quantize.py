"""quantize: give every linear and convolution a weight and activation spec, quantize its weight, fix ranges.

One pass per preset (``w8a8``, ``w8a8-dyn``, ``w8a16``, ``w4a16``, ``w4a8``, ``w4a4``, ``fp8``,
``mxfp8``, ``mxfp4``, ``nvfp4``), plus ``quantize(preset=...)``. Per-layer choices go by glob
on the layer's module path (``encoder.layer.3.output.dense``), node name or weight name: ``skip=*pooler*`` keeps those linears float,
``override=*output.dense*:w8a8`` gives them another preset (several with ``;``).
``fallback=0.25`` keeps up to that share of the linears' weight parameters at
``fallback_preset`` (default ``w8a16`` for weight-only presets, else ``w8a8-dyn``),
filled with the linears whose round-to-nearest weights (under 8-bit weights with static
activations: whose static input ranges) move the model's outputs most per parameter on
calibration data (`qcompiler.quant.sensitivity`). The ``Q^T``
MatMuls that ``rotate`` inserts in front of graph outputs stay float.

The weight quantizer is ``rtn``, ``mse`` (clipping search), ``gptq`` (``X^T X`` of each
linear's input from calibration, by default as the already-quantized layers before it
produce it, as GPTQ does; ``act_order``, ``damp``, ``sequential``; ``scales=mse`` fits its
group scales by clipping search, ``refine`` adds coordinate-descent sweeps over its rounding)
or ``awq`` (activation-aware scales absorbed by each region's producer, then output-error clipping) or ``awq-gptq``
(AWQ's scales, then GPTQ's rounding). Static activation
ranges come from the observer (``minmax``, ``percentile``, ``mse``).

``lorc=R`` or ``eora=R`` adds a rank-R float branch ``(x A) B`` beside each linear that
carries back most of its rounding error (`qcompiler.quant.lowrank`), stored as
``lowrank_dtype`` (fp16 or int8); ``lowrank`` in the report gives its bytes.
``outliers=T`` (LLM.int8()) runs the input channels whose calibration magnitude exceeds T
in float beside the int8 product (`qcompiler.quant.outliers`); ``outliers`` in the report
gives the channels and their share of the multiply-adds.

Convolutions (``Conv`` with a constant kernel; normalize has folded BatchNormalization
into it) are quantized under the same presets. The kernel ``[C_out, C_in/g, k...]`` is
quantized as its ``[C_in/g * k, C_out]`` matrix, so per channel means per output channel;
``rtn`` or ``mse`` (``gptq`` and ``awq`` need statistics of input channels, not of patches,
and take ``mse`` for convolutions, said in the notes). Per-token and grouped activations
run along the input's channel axis, one "token" per pixel. A convolution with static int8
activations also quantizes its output unless its readers already do, the
``DQ -> Conv -> Q`` form onnxruntime runs as QLinearConv.

The result is the simulate form (`qcompiler.quant.simulate`): a QDQ graph onnxruntime runs,
with the resolved specs on each MatMul and Conv as the ``qcompiler.quant`` metadata entry,
which is what backends lower from. ``coverage`` in the report counts, per matrix and
convolution op type, the nodes quantized and those left float with the reason.
"""

from __future__ import annotations

import collections
import fnmatch
from dataclasses import dataclass, field, make_dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.convolutions import Convolution, find_convolutions
from qcompiler.analysis.linears import Linear, constant_array, find_linears
from qcompiler.errors import QCompilerError
from qcompiler.graph import redirect_uses, release_if_unused
from qcompiler.options import option
from qcompiler.pass_api import Pass, PassContext, PassOutcome
from qcompiler.quant import awq, kv_cache, lowrank, outliers, weights
from qcompiler.quant.annotation import ActivationAnnotation, LayerAnnotation, WeightAnnotation
from qcompiler.quant.observers import observe_range
from qcompiler.quant.presets import PRESETS, Scheme, preset_scheme
from qcompiler.quant.sensitivity import SensitivityRow, activation_sensitivity, output_sensitivity
from qcompiler.quant.simulate import dequantized_weight, per_consumer, quantized_activation, stores_codes
from qcompiler.quant.spec import sqnr_db
from qcompiler.registry import register
from qcompiler.stream_rewrite import UNROTATE

# Calibration batches (evenly spread) that fallback's ranking runs on: one model run per
# batch per linear. On MiniLM the top 8 of 37 linears are the same as with all 48 batches.
SENSITIVITY_BATCHES = 8


# weights=gptq's defaults: the best measured on MiniLM (docs/passes/quantize.md: rotate,w4a16 0.9912 against
# 0.9882 with damp=0.1,act_order alone, for about 2x GPTQ's time). refine=0,scales=minmax is the fast form.
GPTQ_BEST = {"act_order": True, "damp": 0.1, "scales": "mse", "refine": 3}
# The same options under every other quantizer (awq-gptq's GPTQ step keeps the original GPTQ's settings).
GPTQ_PLAIN = {"act_order": False, "damp": 0.01, "scales": "minmax", "refine": 0}


@dataclass
class QuantizeOptions:
    preset: str = option("w8a8", "what to quantize to: a preset name (see the presets table)")
    weights: Literal["rtn", "mse", "gptq", "awq", "awq-gptq"] = option(
        "rtn", "weight quantizer: rtn (round to nearest, instant), mse (clipping search, seconds), gptq (Hessian-aware "
               "rounding; about 35 s on MiniLM with its defaults, 16 s with refine=0,scales=minmax), awq "
               "(activation-aware scales, about 10 s), awq-gptq (both)")
    observer: Literal["minmax", "percentile", "mse"] = option(
        "minmax", "static activation ranges from calibration: minmax, percentile (of |x|) or mse")
    percentile: float = option(99.99, "with observer=percentile: the percentile of |x| taken as the range")
    group_size: int | None = option(None, "weight groups along the input (0: per output channel; none: the preset's)")
    # None: the quantizer's own default (GPTQ_BEST for weights=gptq, GPTQ_PLAIN otherwise).
    act_order: bool | None = option(None, "GPTQ: quantize rows in order of diag(H), largest first (gptq: true)")
    damp: float | None = option(None, "GPTQ: dampening added to H as a fraction of mean(diag(H)) (gptq: 0.1)")
    sequential: bool = option(False, "GPTQ: each Hessian from the already-quantized layers before it (about 7x slower)")
    scales: Literal["minmax", "mse"] | None = option(
        None, "GPTQ's group scales: minmax (the weight's range) or mse (clipping searched per scale; gptq: mse)")
    refine: int | None = option(None, "GPTQ: coordinate-descent sweeps over the rounding after GPTQ (gptq: 3, about "
                                      "as long as GPTQ itself)")
    grid: int = option(20, "AWQ, mse and the scale search: candidates tried per search")
    rows: int = option(512, "AWQ: calibration rows per tensor its searches score on")
    skip: tuple[str, ...] = option((), "globs (;-separated) of layers kept float, by module path, node or weight name")
    override: tuple[str, ...] = option((), "glob:preset items (;-separated) giving matching layers another preset; "
                                           "the first match wins")
    fallback: float = option(0.0, "share (0-1) of weight parameters kept at fallback_preset, the linears that move "
                                  "the outputs most per parameter first (one model run per batch per linear)")
    fallback_preset: str = option("", "preset of the fallback layers and of the kept head (default: w8a16 for "
                                      "weight-only presets, else w8a8-dyn)")
    kv: str = option("", "causal LMs: quantize the KV cache to int8 or int4 per head and token (encoders: K and V "
                         "rounded where attention reads them)")
    kv_group: int = option(0, "with kv=: channels per cache scale along the head (0: the whole head)")
    kv_rotate: bool = option(True, "with kv=: rotate keys and queries by an online Hadamard (QuaRot) before rounding")
    lorc: int = option(0, "rank of a float correction (x A) B beside each linear: the SVD of its weight error "
                          "W - Q(W) (ZeroQuant-V2's LoRC; 0: none)")
    eora: int = option(0, "rank of the correction fitted to the outputs on calibration data instead, "
                          "min ||X (W - Q(W) - A B)|| (EoRA; 0: none)")
    lowrank_dtype: Literal["fp16", "int8"] = option("fp16", "with lorc= or eora=: how A and B are stored (int8: "
                                                            "per column, half the bytes)")
    outliers: float = option(0.0, "input channels whose calibration magnitude exceeds this run in float beside the "
                                  "int8 product (LLM.int8()'s split; it uses 6.0; 0: none)")
    head: Literal["8bit", "same"] = option(
        "8bit", "under sub-8-bit weights, keep the final projection (lm_head, a classifier) at fallback_preset "
                "(8bit) or quantize it like the rest (same)")

    def __post_init__(self) -> None:
        if (self.scales is not None and self.scales != "minmax" or self.refine) and \
                self.weights not in ("gptq", "awq-gptq"):
            raise ValueError(f"scales and refine tune GPTQ (weights=gptq or awq-gptq), not weights={self.weights}")
        defaults = GPTQ_BEST if self.weights == "gptq" else GPTQ_PLAIN
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        preset_scheme(self.preset)
        if self.kv:
            problem = kv_cache.kind_problem(self.kv)
            if problem:
                raise ValueError(problem)
        if self.kv_group < 0 or (self.kv_group and not self.kv):
            raise ValueError(f"kv_group is the group size of kv=int8|int4 along the head (0: the whole head), "
                             f"not {self.kv_group}{' without kv=' if self.kv_group and not self.kv else ''}")
        for item in self.override:
            pattern, _, preset = item.rpartition(":")
            if not pattern:
                raise ValueError(f"override '{item}' must be written glob:preset, e.g. *output.dense*:w8a8")
            preset_scheme(preset)
        if not 0 <= self.fallback <= 1:
            raise ValueError(f"fallback is the share of weight parameters kept at higher precision, in [0, 1], "
                             f"not {self.fallback}")
        scheme = preset_scheme(self.preset)
        if self.fallback and scheme.weight.element.bits >= 8 and (scheme.activation is None
                                                                  or scheme.activation.dynamic):
            raise ValueError(f"fallback ranks linears by the damage of rounding their weights below 8 bits or of "
                             f"their static activation ranges; {self.preset} has neither")
        if self.fallback_preset:
            preset_scheme(self.fallback_preset)
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must lie in (0, 100], not {self.percentile}")
        if self.group_size is not None and self.group_size < 0:
            raise ValueError(f"group_size must be 0 (per channel) or positive, not {self.group_size}")
        if self.damp <= 0 or self.grid < 1 or self.rows < 1:
            raise ValueError("damp, grid and rows must be positive")
        if self.lorc < 0 or self.eora < 0:
            raise ValueError("lorc and eora are ranks of the low-rank correction: 0 (none) or more")
        if self.lorc and self.eora:
            raise ValueError("lorc and eora fit the same correction two ways; choose one")
        if self.outliers < 0:
            raise ValueError(f"outliers is a magnitude threshold, 0 (none) or positive, not {self.outliers}")
        if self.outliers and scheme.activation is None:
            raise ValueError(f"outliers splits the channels of quantized activations; {self.preset} keeps "
                             "activations float")
        if self.refine < 0:
            raise ValueError(f"refine counts coordinate-descent sweeps and must be 0 or more, not {self.refine}")


Layer = Linear | Convolution


@dataclass
class LayerPlan:
    linear: Layer
    scheme: Scheme
    preset: str
    head: bool = False  # the final projection, moved to the fallback preset by head=8bit
    float_channels: np.ndarray | None = None  # input channels outliers= moved to the float part

    @property
    def conv(self) -> bool:
        return isinstance(self.linear, Convolution)


class Quantize(Pass):
    name = "quantize"
    summary = "Quantize every linear and Conv under a preset (w8a8, w4a16, ...), with per-layer overrides and a skip list."
    Options = QuantizeOptions
    preserves_function = False

    def scheme(self, preset: str | None = None) -> Scheme:
        """The resolved scheme of ``preset`` (default: this pass's) under the pass's options."""
        return preset_scheme(preset or self.options.preset).with_options(self.options.group_size, self.options.observer)

    def optimizes_for(self) -> Scheme:
        """Searches before quantization (smooth, shift) score against the scheme most linears will get."""
        return self.scheme()

    def plan(self, graph: ir.Graph) -> tuple[list[LayerPlan], list[tuple[Layer, str]]]:
        """Which linears and convolutions get which scheme, and which are skipped (with the reason)."""
        plans: list[LayerPlan] = []
        skipped: list[tuple[Layer, str]] = []
        layers: list[Layer] = [*find_linears(graph), *find_convolutions(graph)]
        for linear in layers:
            if LayerAnnotation.from_node(linear.node) is not None:
                continue  # quantized by an earlier pass (a pre-dequantized grid still looks like a linear)
            if UNROTATE in linear.node.metadata_props:
                # rotate's exact Q^T in front of a graph output or a kept norm: it carries no learned weight,
                # and rounding it would add error the unrotated model never had.
                skipped.append((linear, "rotate's Q^T compensation"))
                continue
            names = (linear.layer, linear.node.name or "", linear.weight.name or "")
            if any(fnmatch.fnmatchcase(n, glob) for glob in self.options.skip for n in names):
                skipped.append((linear, "skip="))
                continue
            preset, head = self.options.preset, False
            for item in self.options.override:
                glob, _, other = item.rpartition(":")
                if any(fnmatch.fnmatchcase(n, glob) for n in names):
                    preset = other
                    break
            else:
                if self.keeps_head(linear):
                    preset, head = self.fallback_preset(), True
            scheme = self.scheme(preset)
            activation = scheme.activation
            grouped = activation is not None and activation.granularity == "group"
            if grouped and linear.in_channels % activation.group_size:
                skipped.append((linear, f"{preset}'s activation groups of {activation.group_size} do not divide its "
                                        f"{linear.in_channels} input channels"))
                continue
            plans.append(LayerPlan(linear, scheme, preset, head))
        return plans, skipped

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        graph = model.graph
        options = self.options
        plans, skipped = self.plan(graph)
        labels = [layer.layer if reason == "skip=" else f"{layer.layer} ({reason})" for layer, reason in skipped]
        if not plans and not any(LayerAnnotation.from_node(node) for node in graph):
            raise QCompilerError(_nothing_to_quantize(graph, self.name, labels))
        details: dict = {"scheme": self.scheme().describe(), "skipped": labels, "notes": []}
        if options.weights in ("awq", "awq-gptq"):
            found = awq.search_and_absorb(model, ctx, {id(p.linear.node): p.scheme for p in plans},
                                          options.grid, options.rows)
            details["awq_alpha"], details["notes"] = found["scaled"], found["notes"]
            plans = self._refresh(graph, plans)
        ranking: list[SensitivityRow] = []
        if options.fallback and plans:
            plans, ranking = self._fall_back(model, ctx, plans)
        if options.outliers:
            details["outliers"] = self._split_outliers(model, ctx, plans)
        inputs = list(dict.fromkeys(p.linear.input.name for p in plans))
        # X^T X and AWQ's rows are statistics of a linear's input channels; a convolution's weight
        # multiplies patches of its input, which those statistics do not see (see _quantize_weight).
        matrix_inputs = list(dict.fromkeys(p.linear.input.name for p in plans if not p.conv))
        static = [n for n in inputs if any(p.linear.input.name == n and p.scheme.activation is not None
                                           and not p.scheme.activation.dynamic for p in plans)]
        requantized = [p for p in plans if p.conv and _int8_static(p.scheme.activation)]
        observed = static + [p.linear.output.name for p in requantized]
        stats = ctx.statistics(model, observed) if observed else {}
        rows = ctx.samples(model, matrix_inputs, options.rows) if options.weights == "awq" and matrix_inputs else {}
        uses_gptq = options.weights in ("gptq", "awq-gptq")
        sequential = uses_gptq and options.sequential
        widths = {p.linear.input.name: p.linear.in_features for p in plans if not p.conv}
        chunks: dict[str, list[str]] = {}  # first input of a chunk -> the inputs whose X^T X one run gathers
        if (uses_gptq or options.eora) and matrix_inputs:
            # Sequential: one input at a time, as the layers before it, already quantized, produce it (GPTQ's
            # order). Else as many as the calibration memory budget holds per run; a later chunk then sees the
            # earlier chunks' layers quantized, as sequential does.
            budget = 0 if sequential else ctx.memory_budget()
            chunks = {chunk[0]: chunk for chunk in _xtx_chunks(matrix_inputs, widths, budget)}

        layers = []
        hessians: dict[str, np.ndarray] = {}
        with ctx.progress(f"quantizing weights ({options.weights})", len(plans)) as advance:
            for name in inputs:
                if name in chunks:
                    gathered = ctx.statistics(model, chunks[name], xtx=chunks[name])
                    if name == matrix_inputs[0]:
                        _warn_if_few_rows(ctx, gathered, widths, "GPTQ" if uses_gptq else "EoRA")
                    hessians = {n: s.xtx for n, s in gathered.items()}
                for plan in plans:
                    if plan.linear.input.name == name:
                        layers.append(self._quantize_weight(graph, plan, hessians, rows))
                        advance()
        for name in inputs:
            self._quantize_input(graph, [p for p in plans if p.linear.input.name == name], stats)
        for plan in requantized:
            self._requantize_output(graph, plan, stats)
        details["notes"] += _notes(options, plans, layers, len(requantized))
        details["layers"] = layers
        details["coverage"] = coverage(graph, {id(layer.node): reason for layer, reason in skipped})
        compensated = [layer["lowrank"] for layer in layers if "lowrank" in layer]
        if compensated:
            details["lowrank"] = {"method": "lorc" if options.lorc else "eora", "storage": options.lowrank_dtype,
                                  "layers": len(compensated), "bytes": sum(c["bytes"] for c in compensated)}
        details["kept_8bit"] = [f"{p.linear.layer} ({p.preset})" for p in plans if p.head]
        if options.kv:
            details.update(kv_cache.quantize_cache(model, options.kv, options.kv_group, options.kv_rotate))
        return PassOutcome(bool(plans) or bool(options.kv), details, findings=ranking)

    def keeps_head(self, layer: Layer) -> bool:
        """Whether ``layer`` is the final projection that ``head=8bit`` keeps at 8-bit weights.

        The last linear before an output (``lm_head``, a classifier) is where rounding error
        meets the logits unaveraged, and it is one layer among many: llm-compressor and
        others leave it out of 4-bit schemes by default, for the same reason.
        """
        return (self.options.head == "8bit" and self.scheme().weight.element.bits < 8
                and reaches_output(layer.output))

    def fallback_preset(self) -> str:
        """The preset of the linears ``fallback`` moves: 8-bit weights, activations as the main preset treats them."""
        if self.options.fallback_preset:
            return self.options.fallback_preset
        return "w8a16" if self.scheme().activation is None else "w8a8-dyn"

    def _fall_back(self, model: ir.Model, ctx: PassContext,
                   plans: list[LayerPlan]) -> tuple[list[LayerPlan], list[SensitivityRow]]:
        """Move the linears that buy the most fidelity per byte to the fallback preset, up to the ``fallback`` share.

        Each linear is scored alone: with round-to-nearest weights under its own scheme where
        weights go below 8 bits, else (8-bit weights, static activations: ``w8a8``) with only
        its input rounded to the static range its observer gives. The ranking needs the
        relative damage of each layer, not the final quantizer's figure, and this keeps the
        search to one model run per batch per linear. Linears are taken in order of damage
        per parameter while they fit the budget: on MiniLM at 4 bits that beats taking the
        most damaging linears first at equal bytes (0.9967 against 0.9950), as small value
        projections come before large FFN matrices. Linears an ``override`` placed keep the
        user's preset and are not ranked.
        """
        candidates = [p for p in plans if p.preset == self.options.preset]
        size = {id(p.linear.node): int(np.prod(constant_array(p.linear.weight).shape)) for p in candidates}
        batches = ctx.batches()
        spread = batches[::max(1, len(batches) // SENSITIVITY_BATCHES)][:SENSITIVITY_BATCHES]
        with ctx.progress("fallback ranking", len(candidates)) as advance:
            if self.scheme().weight.element.bits < 8:
                scores = self._weight_damage(model, candidates, spread, advance)
            else:
                scores = self._activation_damage(model, ctx, candidates, spread, advance)
        ranked = sorted(candidates, key=lambda p: scores[id(p.linear.node)] / size[id(p.linear.node)], reverse=True)
        budget = self.options.fallback * sum(size.values())
        chosen, spent = set(), 0
        for plan in ranked:
            if spent + size[id(plan.linear.node)] <= budget:
                chosen.add(id(plan.linear.node))
                spent += size[id(plan.linear.node)]
        preset = self.fallback_preset()
        moved = [LayerPlan(p.linear, self.scheme(preset), preset) if id(p.linear.node) in chosen else p
                 for p in plans]
        table = [SensitivityRow(p.linear.layer, scores[id(p.linear.node)], size[id(p.linear.node)],
                                preset if id(p.linear.node) in chosen else p.preset) for p in ranked]
        return moved, table

    def _weight_damage(self, model: ir.Model, candidates: list[LayerPlan], batches: list,
                       advance) -> dict[int, float]:
        """Per linear (by node id): the output error with only its weight rounded to nearest."""
        trials, readers = {}, {}
        for plan in candidates:
            weight = plan.linear.as_matrix(constant_array(plan.linear.weight).astype(np.float32))
            rounded = weights.rtn(weight, plan.scheme.weight).dequantize()
            trials[plan.linear.weight.name] = plan.linear.from_matrix(rounded)
            readers.setdefault(plan.linear.weight.name, []).append(id(plan.linear.node))  # a shared weight: several
        scores = output_sensitivity(model, trials, batches, advance)
        return {node: score for name, score in scores.items() for node in readers[name]}

    def _activation_damage(self, model: ir.Model, ctx: PassContext, candidates: list[LayerPlan], batches: list,
                           advance) -> dict[int, float]:
        """Per linear (by node id): the output error with only its input rounded to its static range."""
        stats = ctx.statistics(model, list(dict.fromkeys(p.linear.input.name for p in candidates)))
        index = {id(node): i for i, node in enumerate(model.graph)}
        quantizers = {}
        for plan in candidates:
            spec = plan.scheme.activation
            bounds = observe_range(stats[plan.linear.input.name], spec, self.options.percentile)
            quantizers[index[id(plan.linear.node)]] = (
                lambda graph, x, spec=spec, bounds=bounds, layer=plan.linear:
                quantized_activation(graph, x, spec, bounds, layer.in_channels, layer.channel_axis))
        scores = activation_sensitivity(model, quantizers, batches, advance)
        node_at = {i: node_id for node_id, i in index.items()}
        return {node_at[i]: score for i, score in scores.items()}

    def _refresh(self, graph: ir.Graph, plans: list[LayerPlan]) -> list[LayerPlan]:
        """Linears again after AWQ rewrote weights (a copied weight is a new value)."""
        current = {id(linear.node): linear for linear in find_linears(graph)}
        return [LayerPlan(current.get(id(p.linear.node), p.linear), p.scheme, p.preset, p.head) for p in plans]

    def _quantize_weight(self, graph: ir.Graph, plan: LayerPlan, hessians: dict, rows: dict) -> dict:
        linear, spec = plan.linear, plan.scheme.weight
        weight = linear.as_matrix(constant_array(linear.weight).astype(np.float32))
        if plan.float_channels is not None:
            weight[plan.float_channels] = 0.0  # those rows run in the float part (_split_outliers)
        method = self.options.weights
        if plan.conv and method not in ("rtn", "mse"):
            # GPTQ's X^T X and AWQ's output error would need the im2col patches of the input;
            # the clipping search needs only the kernel.
            method = "mse"
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
        rank = self.options.lorc or self.options.eora
        compensation = None
        if rank and not plan.conv:
            compensation = self._compensate(graph, linear, weight, quantized.dequantize(), hessians, rank)
        old = linear.weight
        kernel_shape = linear.kernel_shape if plan.conv else None
        linear.node.replace_input_with(1, dequantized_weight(graph, quantized, _base_name(linear), linear.node,
                                                             kernel_shape))
        release_if_unused(graph, old)
        weight_sqnr = round(sqnr_db(weight, quantized.dequantize()), 2)
        activation = plan.scheme.activation
        native = stores_codes(quantized, kernel_shape)
        LayerAnnotation(linear.layer, plan.preset,
                        WeightAnnotation(spec, method, native, quantized.tensor_scale),
                        None if activation is None else ActivationAnnotation(activation),
                        weight_sqnr).to_node(linear.node)
        return {"linear": linear.layer, "op": linear.node.op_type, "preset": plan.preset, "weight": spec.describe(),
                "activation": activation.describe() if activation else "float",
                "quantizer": method, "weight_sqnr_db": weight_sqnr, "native": native, "conv": plan.conv,
                **({"lowrank": compensation} if compensation else {}),
                **({"float_channels": len(plan.float_channels)} if plan.float_channels is not None else {})}

    def _compensate(self, graph: ir.Graph, linear: Linear, weight: np.ndarray, dequantized: np.ndarray,
                    hessians: dict, rank: int) -> dict:
        """Add the lorc/eora branch beside ``linear``; what it cost and how much weight error it took back."""
        error = weight - dequantized
        rank = min(rank, *error.shape)
        if self.options.lorc:
            a, b = lowrank.lorc_factors(error, rank)
        else:
            a, b = lowrank.eora_factors(error, hessians[linear.input.name], rank)
        storage = self.options.lowrank_dtype
        a, b = lowrank.stored(a, storage), lowrank.stored(b, storage)
        size = lowrank.add_branch(graph, linear.input, linear.output, a, b, storage, _base_name(linear))
        return {"rank": rank, "bytes": size, "weight_sqnr_db": round(sqnr_db(weight, dequantized + a @ b), 2)}

    def _split_outliers(self, model: ir.Model, ctx: PassContext, plans: list[LayerPlan]) -> dict:
        """LLM.int8()'s split (`qcompiler.quant.outliers`) of every linear with quantized activations.

        Returns, per linear input that has outliers, the float channels; and the share of the
        quantized linears' multiply-adds that the float parts take.
        """
        graph = model.graph
        candidates = [p for p in plans if not p.conv and p.scheme.activation is not None]
        names = list(dict.fromkeys(p.linear.input.name for p in candidates))
        stats = ctx.statistics(model, names) if names else {}
        split, float_macs, weight_bytes = {}, 0, 0
        for name in names:
            group = [p for p in candidates if p.linear.input.name == name]
            source, in_channels = group[0].linear.input, group[0].linear.in_features
            channels = outliers.outlier_channels(stats[name].absmax, self.options.outliers)
            if not len(channels) or len(channels) == in_channels:
                continue  # nothing to split, or nothing left for int8 (the threshold is below every channel)
            for plan in group:
                weight = plan.linear.as_matrix(constant_array(plan.linear.weight).astype(np.float32))
                weight_bytes += outliers.add_float_part(graph, source, plan.linear.output, weight, channels,
                                                        _base_name(plan.linear))
                plan.float_channels = channels
                float_macs += len(channels) * plan.linear.out_features
            outliers.mask_inliers(graph, source, channels, in_channels, [p.linear.node for p in group],
                                  _base_name(group[0].linear))
            split[name] = {"float_channels": [int(c) for c in channels], "of": in_channels}
        total_macs = sum(p.linear.in_features * p.linear.out_features for p in candidates)
        return {"threshold": self.options.outliers, "inputs": split, "float_bytes": weight_bytes,
                "float_share": round(float_macs / total_macs, 5) if total_macs else 0.0}

    def _quantize_input(self, graph: ir.Graph, plans: list[LayerPlan], stats: dict) -> None:
        """One quantize-dequantize per distinct activation spec of the linears sharing an input."""
        shared_input = plans[0].linear.input if plans else None
        by_spec: dict = {}
        for plan in plans:
            if plan.scheme.activation is not None:
                by_spec.setdefault(plan.scheme.activation, []).append(plan)
        for spec, group in by_spec.items():
            source = group[0].linear.input
            bounds = None
            if not spec.dynamic:
                bounds = observe_range(stats[source.name], spec, self.options.percentile)
            layer = group[0].linear
            read = source if spec.dynamic else outliers.unmasked(source)  # a static range makes the mask redundant
            quantized = quantized_activation(graph, read, spec, bounds, layer.in_channels, layer.channel_axis)
            for plan, value in zip(group, per_consumer(graph, quantized, len(group))):
                plan.linear.node.replace_input_with(0, value)
                annotation = LayerAnnotation.from_node(plan.linear.node)
                annotation.with_activation(bounds, read.name).to_node(plan.linear.node)
        outliers.remove_unused_mask(shared_input)


    def _requantize_output(self, graph: ir.Graph, plan: LayerPlan, stats: dict) -> None:
        """Quantize a static int8 convolution's output too, so onnxruntime can run it as QLinearConv.

        onnxruntime fuses ``DQ -> Conv -> Q`` into QLinearConv (integer in, integer out) and
        has no integer convolution that returns float; with only its input quantized, a
        Conv runs in float behind a DequantizeLinear, slower than no quantization. When
        every reader of the output quantizes it already (the next convolution's input),
        that Q completes the pattern and nothing is added.
        """
        output = plan.linear.output
        readers = [use.node for use in output.uses()]
        if readers and not output.is_graph_output() and all(r.op_type == "QuantizeLinear" for r in readers):
            return
        spec = plan.scheme.activation
        bounds = observe_range(stats[output.name], spec, self.options.percentile)
        quantized = quantized_activation(graph, output, spec, bounds, plan.linear.kernel_shape[0], 1)
        quantize_node = quantized.producer().inputs[0].producer()
        redirect_uses(graph, output, quantized, except_node=quantize_node)
        LayerAnnotation.from_node(plan.linear.node).with_output(bounds).to_node(plan.linear.node)


def _notes(options: QuantizeOptions, plans: list[LayerPlan], layers: list[dict], requantized: int) -> list[str]:
    """What the report should say about how the layers were stored and quantized, beyond the per-layer table."""
    notes = []
    swapped = sorted({layer["quantizer"] for layer in layers if layer["quantizer"] != options.weights})
    if swapped:
        notes.append(f"{options.weights} needs statistics of a linear's input channels, which a convolution's patches "
                     f"are not: convolutions were quantized with {', '.join(swapped)}")
    if requantized:
        notes.append(f"{requantized} convolution(s) with static int8 activations also quantize their output (the "
                     "QLinearConv form), unless every reader of it quantizes it already")
    unrefined = sorted({p.scheme.weight.describe() for p in plans if p.scheme.weight.element.kind != "int"})
    if options.weights in ("gptq", "awq-gptq") and options.refine and unrefined:
        notes.append(f"refine moves integer codes; {', '.join(unrefined)} weights keep GPTQ's rounding")
    pre_dequantized = sorted({layer["weight"] for layer in layers if not layer["native"] and not layer["conv"]})
    if pre_dequantized:
        notes.append(f"onnxruntime has no DequantizeLinear kernel for {', '.join(pre_dequantized)} weights: those are "
                     "stored pre-dequantized (float32 values exactly on the quantized grid), so fidelity is exact but "
                     "size is not")
    if (options.lorc or options.eora) and any(layer["conv"] for layer in layers):
        notes.append("lorc and eora compensate linears; convolutions got no low-rank branch")
    grouped_kernels = sorted({layer["weight"] for layer in layers if layer["conv"] and not layer["native"]})
    if grouped_kernels:
        notes.append(f"convolution weights under {', '.join(grouped_kernels)} are stored pre-dequantized (float32 "
                     "values exactly on the grid): DequantizeLinear has no layout for their scales on a kernel")
    return notes


def _xtx_chunks(names: list[str], widths: dict[str, int], budget: int) -> list[list[str]]:
    """Consecutive runs of ``names`` whose ``X^T X`` (``C^2`` float64 each) fit ``budget`` bytes together (at least one)."""
    chunks: list[list[str]] = []
    held = 0
    for name in names:
        size = widths[name] ** 2 * 8
        if not chunks or held + size > budget:
            chunks.append([])
            held = 0
        chunks[-1].append(name)
        held += size
    return chunks


def _warn_if_few_rows(ctx: PassContext, stats: dict, channels: dict[str, int], user: str) -> None:
    """``X^T X`` of C channels is singular below C rows and noisy near it: say so, with the count."""
    rows = min(s.count for s in stats.values())
    widest = max(channels.values())
    if rows < 2 * widest:
        ctx.warn(f"{user} estimated X^T X from {rows} calibration rows (tokens), fewer than twice the {widest} "
                 "input channels of the widest linear: it leans on dampening; give more calibration data")


def _int8_static(spec) -> bool:
    """Static per-tensor int8 activations: the spec onnxruntime's QDQ fusions turn into integer kernels."""
    return spec is not None and spec.format == "int8" and not spec.dynamic and spec.granularity == "tensor"


# Ops between a final projection and the graph output that do not mix in other computation.
LAYOUT_OPS = ("Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Softmax", "LogSoftmax")


def reaches_output(value: ir.Value) -> bool:
    """Whether ``value`` is a graph output, or becomes one through layout ops only (a model's last projection)."""
    while not value.is_graph_output():
        readers = [use.node for use in value.uses()]
        if len(readers) != 1 or readers[0].op_type not in LAYOUT_OPS or not readers[0].outputs:
            return False
        value = readers[0].outputs[0]
    return True


HEAVY_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum")


def coverage(graph: ir.Graph, skipped: dict[int, str]) -> dict[str, dict]:
    """Per matrix or convolution op type: how many nodes are quantized, how many stay float, and why.

    An artifact whose outputs match FP32 may simply have quantized nothing that matters
    (a CNN whose only quantized node is the classifier head); this is what says so.
    ``skipped`` maps a node's id to the reason the plan left it float.
    """
    table: dict[str, dict] = {}
    for node in graph:
        if node.op_type not in HEAVY_OPS or node.domain not in ("", "ai.onnx"):
            continue
        row = table.setdefault(node.op_type, {"quantized": 0, "float": 0, "float_reasons": {}})
        if LayerAnnotation.from_node(node) is not None:
            row["quantized"] += 1
            continue
        row["float"] += 1
        reason = skipped.get(id(node)) or _why_float(node)
        row["float_reasons"][reason] = row["float_reasons"].get(reason, 0) + 1
    return table


def _why_float(node: ir.Node) -> str:
    """Why the plan never saw ``node`` as a layer to quantize."""
    if node.op_type == "MatMul" and lowrank.KEY in node.metadata_props:
        return "low-rank compensation branch (float by design)"
    if node.op_type == "MatMul" and outliers.KEY in node.metadata_props:
        return "outlier channels of outliers= (float by design)"
    if node.op_type == "MatMul":
        return "no constant 2-D weight (both operands computed, as in attention)"
    if node.op_type == "Conv":
        return "its kernel is not a constant"
    if node.op_type == "Gemm":
        return "canonical-linear kept it a Gemm (transA=1 or a computed weight)"
    return f"qcompiler does not quantize {node.op_type}"


def _nothing_to_quantize(graph: ir.Graph, preset: str, skipped: list[str]) -> str:
    """One sentence on why a quantize pass found no linear: an artifact identical to FP32 is no success."""
    if skipped:
        return f"Preset '{preset}' has no linear left to quantize: all {len(skipped)} were skipped ({skipped[0]}, ...)."
    heavy = collections.Counter(node.op_type for node in graph if node.op_type in HEAVY_OPS)
    found = ", ".join(f"{op} x{count}" for op, count in heavy.most_common()) or "none"
    return (f"Preset '{preset}' found no layer to quantize (a MatMul or Gemm with a constant 2-D weight, or a Conv "
            f"with a constant kernel); the model's matrix and convolution ops are: {found}.")


def _base_name(linear: Linear) -> str:
    return linear.weight.name or linear.node.name or "weight"


def _preset_pass(preset: str, summary: str) -> type[Pass]:
    options = make_dataclass(f"{preset.title().replace('-', '')}Options",
                             [("preset", str, field(default=preset))], bases=(QuantizeOptions,))
    return type(f"Quantize{preset.title().replace('-', '')}", (Quantize,),
                {"name": preset, "summary": f"Quantize: {summary}.", "Options": options})


register(Quantize)
for _name, (_scheme, _summary) in PRESETS.items():
    register(_preset_pass(_name, _summary))
