"""reassemble: QLLM's channel disassembly and assembly, one online channel map before each linear group.

An outlier channel quantizes badly because it sets the range everything else shares.
Disassembly splits channel ``j`` (``max |x_j| > theta``) into ``k = ceil(max |x_j| / theta)``
channels carrying ``x_j / k``, with the linears' weight row ``W_j`` repeated ``k`` times
(exact; ``C`` grows by ``k - 1``). Assembly merges similar pairs to bring ``C`` back::

    split:  x_j W_j = sum_{i<k} (x_j / k) W_j                                 (exact)
    merge:  x_a W_a + x_b W_b ~ ((x_a + x_b) / 2)(W_a + W_b),  error (x_a - x_b)(W_a - W_b) / 2

Pairs are chosen greedily by that error's norm ``||x_a - x_b|| ||W_a - W_b|| / 2`` on the
calibration rows, and ``theta`` per group by the quantized output error under the
pipeline's target (the preset that follows; int8 W8A8 without one), "no change" included.
Splits deploy as ``x' = Concat(x / k, Gather(x / k, extra parts))`` before the linears,
``/ k`` folded into the producer where it absorbs a per-channel scale (else one ``Mul``):
ONNX producers (LayerNorm, GELU, attention) cannot emit more channels than they compute,
so the small Gather and the Concat stay online. Merges move any channel, so they take two
full ``Gather``s, two ``Mul``s and an ``Add``. With ``assemble=false`` (the default: on
MiniLM it is both more accurate and faster than assembling, docs/passes/reassemble.md) the
pass is exact and verified as such; with merges it changes the function and the report
shows by how much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.absorb import absorb_affine, rewrite_constant
from qcompiler.analysis.linears import Linear, constant_array, find_linears
from qcompiler.analysis.regions import Region, find_regions
from qcompiler.graph import add_initializer, insert_after_producer, unique_node_name
from qcompiler.options import option
from qcompiler.pass_api import Pass, PassContext, PassOutcome
from qcompiler.quant.presets import Scheme
from qcompiler.quant.proxy import PROXY_SCHEME
from qcompiler.quant.spec import fake_quant
from qcompiler.registry import register


@dataclass
class ReassembleOptions:
    assemble: bool = option(False, "also merge similar channel pairs to keep C (approximate, a full gather online)")
    growth: float = option(0.125, "most channels the splits may add to an activation, as a share of its C")
    rows: int = option(1024, "calibration rows (tokens) per activation that theta is searched on")

    def __post_init__(self) -> None:
        if not 0 < self.growth <= 1 or self.rows < 1:
            raise ValueError("growth must be in (0, 1] and rows >= 1")


@dataclass
class ChannelMap:
    """``x'[:, e] = x[:, first[e]] * first_scale[e] + x[:, second[e]] * second_scale[e]`` and its weight rows."""

    first: np.ndarray
    second: np.ndarray
    first_scale: np.ndarray
    second_scale: np.ndarray
    copies: np.ndarray  # per source channel: how many channels carry its parts
    theta: float
    merges: int

    @property
    def splits(self) -> int:
        return int((self.copies > 1).sum())

    @property
    def merged(self) -> np.ndarray:
        return self.second != self.first

    def activation(self, x: np.ndarray) -> np.ndarray:
        return x[:, self.first] * self.first_scale + x[:, self.second] * self.second_scale

    def weight(self, w: np.ndarray) -> np.ndarray:
        """Row ``e`` of ``W'``: ``W[first]``, plus ``W[second]`` where a pair was merged."""
        return w[self.first] + np.where(self.merged[:, None], w[self.second], 0)


def split_counts(maxima: np.ndarray, theta: float, block: int) -> np.ndarray:
    """Copies per channel: ``ceil(max / theta)``, then more for the largest parts until ``C'`` fills ``block``."""
    counts = np.maximum(np.ceil(maxima / theta), 1).astype(np.int64)
    while counts.sum() % block:
        j = int(np.argmax(maxima / counts))
        counts[j] += 1
    return counts


def merge_order(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Channel pairs ``[m, 2]`` in increasing merge error ``||x_a - x_b|| ||W_a - W_b||``."""
    def squared_distances(columns: np.ndarray) -> np.ndarray:
        gram = columns.T @ columns
        norms = np.diag(gram)
        return np.maximum(norms[:, None] + norms[None, :] - 2 * gram, 0)

    cost = squared_distances(x.astype(np.float64)) * squared_distances(w.T.astype(np.float64))
    a, b = np.triu_indices(len(cost), k=1)
    order = np.argsort(cost[a, b], kind="stable")
    return np.stack([a[order], b[order]], axis=1)


def build_map(counts: np.ndarray, merges: int, pairs: np.ndarray, theta: float) -> ChannelMap:
    """The channel map splitting channel ``c`` into ``counts[c]`` and merging the first ``merges`` free pairs."""
    taken = counts > 1
    partner: dict[int, int] = {}
    for a, b in pairs:
        if len(partner) == merges:
            break
        if not taken[a] and not taken[b]:
            taken[a] = taken[b] = True
            partner[int(a)] = int(b)
    if len(partner) < merges:
        raise ValueError("not enough channels left to merge")
    if not partner:  # splits only: the channels as they were (each part), then the extra parts
        first = np.concatenate([np.arange(len(counts)), np.repeat(np.arange(len(counts)), counts - 1)])
        share = 1.0 / counts[first]
        return ChannelMap(first, first, share, np.zeros_like(share), counts, theta, 0)
    dropped = set(partner.values())
    first, second, scale, second_scale = [], [], [], []
    for c, count in enumerate(counts):
        if c in dropped:
            continue
        other = partner.get(c, c)
        share = 0.5 if other != c else 1.0 / count
        for _ in range(count):
            first.append(c), second.append(other), scale.append(share), second_scale.append(share if other != c else 0.0)
    return ChannelMap(np.array(first), np.array(second), np.array(scale), np.array(second_scale), counts, theta, merges)


def input_block(scheme: Scheme) -> int:
    """The multiple ``C'`` must stay: the weight's input-axis groups and the activation's blocks."""
    block = 1
    if scheme.weight.granularity == "group":
        block = math.lcm(block, scheme.weight.group_size)
    if scheme.activation is not None and scheme.activation.granularity == "group":
        block = math.lcm(block, scheme.activation.group_size)
    return block


def quantized_error(x: np.ndarray, weights: list[np.ndarray], mapping: ChannelMap | None, scheme: Scheme) -> float:
    """``sum_k ||Q(x') Q(W_k') - x W_k||^2 / sum_k ||x W_k||^2`` (no map: ``x' = x``)."""
    moved = mapping.activation(x) if mapping is not None else x
    if scheme.activation is not None:
        moved = fake_quant(moved, scheme.activation, "activation")
    error = total = 0.0
    for w in weights:
        exact = x @ w
        quantized = moved @ fake_quant(mapping.weight(w) if mapping is not None else w, scheme.weight, "weight")
        error += float(np.sum(np.square(quantized - exact, dtype=np.float64)))
        total += float(np.sum(np.square(exact, dtype=np.float64)))
    return error / (total or 1.0)


def float_error(x: np.ndarray, weights: list[np.ndarray], mapping: ChannelMap) -> float:
    """The merges' own relative error, before any quantization."""
    moved = mapping.activation(x)
    error = sum(float(np.sum(np.square(moved @ mapping.weight(w) - x @ w, dtype=np.float64))) for w in weights)
    return error / (sum(float(np.sum(np.square(x @ w, dtype=np.float64))) for w in weights) or 1.0)


def search_map(x: np.ndarray, weights: list[np.ndarray], scheme: Scheme, assemble: bool, growth: float
               ) -> tuple[ChannelMap | None, float, float]:
    """The channel map with the least quantized error (None: no map beats none), its error and no map's.

    Candidates lower ``theta`` from the largest channel maximum by a factor ``0.8`` at a time
    while the channels the splits add (filling whole groups included) stay within ``growth * C``.
    """
    channels = x.shape[1]
    maxima = np.abs(x).max(axis=0)
    block = 1 if assemble else input_block(scheme)
    pairs = merge_order(x, np.concatenate(weights, axis=1)) if assemble else np.empty((0, 2), int)
    none = quantized_error(x, weights, None, scheme)
    best, best_error = None, none
    theta = float(maxima.max()) * 0.8
    while theta > 0:
        counts = split_counts(maxima, theta, block)
        extra = int(counts.sum()) - channels
        if extra > growth * channels:
            break
        try:
            mapping = build_map(counts, extra if assemble else 0, pairs, theta)
        except ValueError:  # too few channels left to merge
            break
        error = quantized_error(x, weights, mapping, scheme)
        if error < best_error:
            best, best_error = mapping, error
        theta *= 0.8
    return best, best_error, none


@register
class Reassemble(Pass):
    name = "reassemble"
    summary = "QLLM: split outlier channels (optionally merge similar pairs to keep C), theta searched per linear group."
    Options = ReassembleOptions

    @property
    def preserves_function(self) -> bool:  # type: ignore[override]
        """Splits alone are exact; merges approximate."""
        return not self.options.assemble

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        graph = model.graph
        groups, skipped = _groups(graph)
        rows = ctx.samples(model, list(groups), self.options.rows) if groups else {}
        scheme = ctx.target or PROXY_SCHEME
        transformed: dict[str, dict] = {}
        notes: list[str] = []
        added_macs = 0
        region_of = {id(sink.linear.matmul): region for region in find_regions(graph).regions for sink in region.sinks}
        with ctx.progress("reassemble search", len(groups)) as advance:
            for name, (value, linears) in groups.items():
                x = rows[name].astype(np.float64)
                block = 1 if self.options.assemble else input_block(scheme)
                if block > self.options.growth * x.shape[1]:
                    skipped[name] = (f"a split must add a whole group of {block} channels, more than growth "
                                     f"{self.options.growth:g} of {x.shape[1]} allows")
                    advance()
                    continue
                weights = [constant_array(lin.weight).astype(np.float64) for lin in linears]
                mapping, error, none = search_map(x, weights, scheme, self.options.assemble, self.options.growth)
                advance()
                if mapping is None:
                    skipped[name] = f"no theta quantizes better than leaving the channels ({none:.3g})"
                    continue
                region = region_of.get(id(linears[0].matmul))
                absorbs = region is not None and len(region.sinks) == len(linears) and region.absorbs_scale_of(value)
                where = _deploy(graph, value, linears, mapping, region if absorbs else None, notes)
                extra = len(mapping.first) - x.shape[1]
                added_macs += extra * sum(lin.out_features for lin in linears)
                transformed[name] = {
                    "channels": x.shape[1], "channels_after": len(mapping.first), "theta": mapping.theta,
                    "split": mapping.splits, "merged": mapping.merges, "scale": where,
                    "merge_error": float_error(x, weights, mapping) if mapping.merges else 0.0,
                    "loss": {"none": none, "reassembled": error}}
        linear_macs = sum(lin.in_features * lin.out_features for lin in find_linears(graph)) - added_macs
        return PassOutcome(bool(transformed), {
            "transformed": transformed, "skipped": skipped, "target": scheme.describe(), "notes": notes,
            "added_macs_share": added_macs / linear_macs if linear_macs else 0.0})


def _groups(graph: ir.Graph) -> tuple[dict[str, tuple[ir.Value, list[Linear]]], dict[str, str]]:
    """The linears reading each activation, keyed by its name; activations refused, with why."""
    readers: dict[str, tuple[ir.Value, list[Linear]]] = {}
    for linear in find_linears(graph):
        readers.setdefault(linear.input.name, (linear.input, []))[1].append(linear)
    groups, skipped = {}, {}
    for name, (value, linears) in readers.items():
        if any(len(lin.weight.uses()) > 1 for lin in linears):
            skipped[name] = "a weight is shared with other readers"
        elif not all(isinstance(lin.weight.shape[0], int) for lin in linears):
            skipped[name] = "the linears' input size is not a number"
        else:
            groups[name] = (value, linears)
    return groups, skipped


def _deploy(graph: ir.Graph, value: ir.Value, linears: list[Linear], mapping: ChannelMap,
            region: Region | None, notes: list[str]) -> str:
    """Insert the online map before the linears and give them the matching weight rows; how the scale went in.

    Splits only: ``x' = concat(x / k, gather(x / k, extra parts))`` with ``/ k`` folded into
    the producer where it absorbs a scale (one small Gather and a Concat stay online).
    With merges every channel may move: ``x' = gather(x, first) * a + gather(x, second) * b``.
    """
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    label = f"{value.name}_reassemble"
    nodes: list[ir.Node] = []

    def constant(name: str, array: np.ndarray) -> ir.Value:
        return add_initializer(graph, f"{label}_{name}", array)

    def add(op: str, inputs: list[ir.Value], **attributes) -> ir.Value:
        node = ir.node(op, inputs, attributes=attributes, name=unique_node_name(graph, f"{label}_{op.lower()}{len(nodes)}"))
        node.outputs[0].type = value.type
        nodes.append(node)
        return node.outputs[0]

    if mapping.merges:
        where = "online"
        out = add("Add", [add("Mul", [add("Gather", [value, constant("first", mapping.first)], axis=-1),
                                      constant("first_scale", mapping.first_scale.astype(dtype))]),
                          add("Mul", [add("Gather", [value, constant("second", mapping.second)], axis=-1),
                                      constant("second_scale", mapping.second_scale.astype(dtype))])])
        weight_rows = mapping.weight
    else:
        copies = mapping.copies.astype(np.float64)
        if region is not None:
            absorb_affine(graph, region, copies, None, notes)  # the producer emits x / k; the sinks' rows times k
            scaled, where = value, "producer"
            weight_rows = lambda w: (w / copies[:, None])[mapping.first]  # noqa: E731 -- undo the rows' k: parts keep W_j
        else:
            scaled, where = add("Mul", [value, constant("scale", (1 / copies).astype(dtype))]), "online"
            weight_rows = mapping.weight
        extra = mapping.first[len(copies):]
        out = add("Concat", [scaled, add("Gather", [scaled, constant("extra", extra)], axis=-1)], axis=-1)
    out.name = f"{value.name}_reassembled"
    if value.shape is not None:
        out.shape = ir.Shape([*value.shape[:-1], len(mapping.first)])
    insert_after_producer(graph, value, nodes)
    for linear in linears:
        linear.matmul.replace_input_with(0, out)
        rewrite_constant(graph, linear.matmul, 1, weight_rows, notes)
        linear.matmul.inputs[1].shape = ir.Shape(linear.matmul.inputs[1].const_value.shape)
    return where
