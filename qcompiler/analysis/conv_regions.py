"""Convolution regions: an NCHW activation, the producer that absorbs a per-channel transform, its Conv sinks.

The channel-first counterpart of `qcompiler.analysis.regions`. A convolution reads its
input channel ``c`` through ``W[:, c, ...]`` (within its group), so a per-channel scale
``x' = x / s`` is undone exactly by ``W'[:, c] = s_c W[:, c]``, and a shift ``x' = x - z``
by ``b' = b + sum_{c,k} W[:, c, k] z_c`` as long as the sink pads nothing (a zero pad of
``x'`` is ``z`` in ``x``). The producer makes ``x'`` appear: a Conv divides its output
channel ``c`` (kernel and bias), a BatchNormalization its scale and bias. Between the two
the region sees through ReLU (positive scales only), MaxPool (max commutes with a
positive scale and with a shift), GlobalAveragePool and AveragePool (linear per channel;
a shift passes only where padding is left out of the average). Readers of the source
outside the region (a residual Add, a graph output) get ``x' * s + z`` back through one
elementwise op each (`qcompiler.absorb.compensate_readers`); a value further along the
path read from outside refuses the region.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.convolutions import Convolution, as_convolution, find_convolutions
from qcompiler.analysis.linears import constant_array, is_constant
from qcompiler.analysis.regions import CAPABILITIES, ROTATE, SCALE, SHIFT

_SEE_THROUGH = ("Relu", "MaxPool", "GlobalAveragePool", "AveragePool")
CONV_ROTATE_REASON = "convolution regions take per-channel transforms only (a rotation would mix kernels' channels)"


@dataclass
class ConvRegion:
    """One activation read by convolutions along axis 1, what produces it, and what it can absorb.

    ``kind`` is ``conv`` (``absorber`` is that Conv), ``batchnorm`` or ``unabsorbable``.
    ``path`` holds the ReLU and pooling nodes between ``source`` and the sinks; ``foreign``
    the readers of ``source`` outside the region (``None`` for a graph output).
    """

    kind: str
    source: ir.Value
    producer: ir.Node | None
    absorber: Convolution | None
    sinks: list[Convolution]
    path: list[ir.Node]
    channels: int
    capabilities: frozenset[str]
    refused: dict[str, str]
    foreign: list[ir.Node | None]

    @property
    def name(self) -> str:
        return self.source.name or "?"

    @property
    def producer_label(self) -> str:
        if self.producer is None:
            return "graph input"
        return f"{self.producer.name or self.producer.op_type} ({self.kind if self.kind != 'unabsorbable' else self.producer.op_type})"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


def find_conv_regions(graph: ir.Graph) -> list[ConvRegion]:
    """Every region whose sinks are convolutions, in graph order of their first sink."""
    groups: dict[int, tuple[ir.Value, list[Convolution], list[ir.Node]]] = {}
    for conv in find_convolutions(graph):
        source, path = _walk_back(conv.input)
        _, sinks, nodes = groups.setdefault(id(source), (source, [], []))
        sinks.append(conv)
        nodes.extend(n for n in path if all(n is not m for m in nodes))
    return [_build(source, sinks, path) for source, sinks, path in groups.values()]


def _walk_back(value: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    path = []
    while True:
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _SEE_THROUGH:
            return value, path
        if value is not node.outputs[0]:  # MaxPool's Indices output is no activation
            return value, path
        path.append(node)
        value = node.inputs[0]


def _build(source: ir.Value, sinks: list[Convolution], path: list[ir.Node]) -> ConvRegion:
    producer = source.producer()
    kind, absorber, reason = _classify(source, producer)
    channels = _channels(source, producer, absorber)
    refused: dict[str, str] = {ROTATE: CONV_ROTATE_REASON}
    inside = {id(n) for n in path} | {id(s.node) for s in sinks}
    foreign: list[ir.Node | None] = [u.node for u in source.uses() if id(u.node) not in inside]
    foreign += [None] if source.is_graph_output() else []
    if reason is None:
        reason = _layout_problem(source, sinks, channels) or _path_read_outside(path, inside)
    if reason is not None:
        refused.update({c: reason for c in CAPABILITIES})
    else:
        refused.update({SHIFT: why for why in [_shift_problem(sinks, path)] if why})
    capabilities = frozenset(c for c in CAPABILITIES if c not in refused)
    return ConvRegion(kind, source, producer, absorber, sinks, path, channels or 0, capabilities, refused, foreign)


def _classify(source: ir.Value, producer: ir.Node | None) -> tuple[str, Convolution | None, str | None]:
    if producer is None:
        return "unabsorbable", None, "producer is a graph input" if not is_constant(source) else "the Conv reads a constant"
    if producer.op_type == "Conv" and producer.domain in ("", "ai.onnx"):
        absorber = as_convolution(producer)
        if absorber is None:
            return "unabsorbable", None, "the producing Conv's kernel is not a constant"
        if any(v is not None and constant_array(v) is None for v in producer.inputs[2:]):
            return "unabsorbable", None, "the producing Conv's bias is not a constant"
        return "conv", absorber, None
    if producer.op_type == "BatchNormalization" and producer.domain in ("", "ai.onnx"):
        if len([o for o in producer.outputs if o.uses() or o.is_graph_output()]) > 1:
            return "unabsorbable", None, "BatchNormalization in training mode (running statistics are outputs)"
        if constant_array(producer.inputs[1]) is None or constant_array(producer.inputs[2]) is None:
            return "unabsorbable", None, "the BatchNormalization's scale or bias is not a constant"
        return "batchnorm", None, None
    return "unabsorbable", None, f"producer {producer.op_type} is not linear in its output channels"


def _channels(source: ir.Value, producer: ir.Node | None, absorber: Convolution | None) -> int | None:
    if absorber is not None:
        return absorber.kernel_shape[0]
    if producer is not None and producer.op_type == "BatchNormalization":
        return int(constant_array(producer.inputs[1]).size)
    shape = source.shape
    return int(shape[1]) if shape is not None and len(shape) > 1 and isinstance(shape[1], int) else None


def _layout_problem(source: ir.Value, sinks: list[Convolution], channels: int | None) -> str | None:
    if channels is None:
        return f"the channel count of '{source.name}' is unknown"
    for sink in sinks:
        if sink.in_channels != channels:
            return f"sink Conv '{sink.name}' reads {sink.in_channels} channels, the producer makes {channels}"
    return None


def _path_read_outside(path: list[ir.Node], inside: set[int]) -> str | None:
    for value in (n.outputs[0] for n in path):
        for use in value.uses():
            if id(use.node) not in inside:
                return f"'{value.name}' is also read by {use.node.name or use.node.op_type} outside the region"
        if value.is_graph_output():
            return f"'{value.name}' is a graph output"
    return None


def _shift_problem(sinks: list[Convolution], path: list[ir.Node]) -> str | None:
    if any(n.op_type == "Relu" for n in path):
        return "ReLU on the path commutes only with positive per-channel scales"
    averaging = next((n for n in path if n.op_type == "AveragePool" and _pads(n) and _attribute(n, "count_include_pad")),
                     None)
    if averaging is not None:
        return f"AveragePool '{averaging.name}' averages zero padding in, which a shift would move"
    padded = next((s for s in sinks if _pads(s.node)), None)
    if padded is not None:
        return f"sink Conv '{padded.name}' pads its input with zeros, which a shift would turn into -z at the borders"
    return None


def _attribute(node: ir.Node, name: str, default: int = 0) -> int:
    attribute = node.attributes.get(name)
    return int(attribute.value) if attribute is not None else default


def _pads(node: ir.Node) -> bool:
    """Whether a Conv or pool pads its input (explicit pads, or SAME auto-padding)."""
    auto_pad = node.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.value in ("SAME_UPPER", "SAME_LOWER"):
        return True
    pads = node.attributes.get("pads")
    return pads is not None and any(int(p) for p in pads.value)


def kernel_input_max(region: ConvRegion) -> np.ndarray:
    """Per input channel of the region, the largest |weight| any sink reads it with (over outputs and kernel taps)."""
    result = np.zeros(region.channels)
    for sink in region.sinks:
        kernel = np.abs(constant_array(sink.node.inputs[1]))
        out_channels, per_group = kernel.shape[:2]
        per_output = kernel.reshape(out_channels, per_group, -1).max(axis=2)
        per_input = per_output.reshape(sink.groups, out_channels // sink.groups, per_group).max(axis=1).reshape(-1)
        np.maximum(result, per_input, out=result)
    return result
