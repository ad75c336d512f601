"""equalize: cross-layer equalization of convolution pairs through ReLU and ReLU6 (Data-Free Quantization).

Two convolutions in a chain ``Conv1 -> act -> Conv2`` where ``act`` is positively
homogeneous per channel can trade a scale per channel: output channel ``c`` of Conv1
divided by ``s_c`` and input channel ``c`` of Conv2 multiplied by it compute the same
function. DFQ (Nagel et al., 2019) picks ``s`` so that both weights get the same range
per channel, which is what per-tensor (and helps per-channel) weight grids need::

    W1[c] /= s_c   b1[c] /= s_c   W2[:, c] *= s_c      s_c = sqrt(r1_c / r2_c)

with ``r1_c`` the absolute max of Conv1's output channel ``c`` and ``r2_c`` that of Conv2's
input channel ``c``; both ranges become ``sqrt(r1_c r2_c)``. ReLU commutes with a positive
scale; ReLU6 (``Clip(0, 6)``) does too once its upper bound becomes per channel, so a
ReLU6 is rewritten as ``Min(Relu(x), 6 / s_c)``, which is exact. Depthwise convolutions
take part on either side (their input channel ``c`` is their output channel ``c``). The
pass sweeps the chain's pairs ``iterations`` times, as DFQ does, since equalizing one pair
moves the ranges its neighbours see.

A pair is taken only where Conv1's output is read by the activation alone and the
activation by Conv2 alone (a residual branch or a graph output needs the unscaled value).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.convolutions import Convolution, find_convolutions
from qcompiler.analysis.linears import constant_array
from qcompiler.graph import add_initializer, release_if_unused, replace_node, unique_node_name
from qcompiler.options import option
from qcompiler.pass_api import Pass, PassContext, PassOutcome
from qcompiler.registry import register

HOMOGENEOUS = ("Relu", "Clip")


@dataclass
class EqualizeOptions:
    iterations: int = option(4, "sweeps of cross-layer equalization over the Conv pairs")

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations counts sweeps over the convolution pairs and must be 1 or more, "
                             f"not {self.iterations}")


@dataclass
class _Pair:
    first: Convolution
    activation: ir.Node
    second: Convolution

    @property
    def name(self) -> str:
        return f"{self.first.name} -> {self.activation.op_type} -> {self.second.name}"


@register
class Equalize(Pass):
    name = "equalize"
    summary = "Cross-layer equalization (DFQ) of Conv -> ReLU/ReLU6 -> Conv pairs: equal weight ranges per channel."
    Options = EqualizeOptions

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        graph = model.graph
        pairs, refused = _pairs(graph)
        if not pairs:
            return PassOutcome(False, {"equalized": [], "refused": refused})
        before = {pair.name: _imbalance(pair) for pair in pairs}
        bounds: dict[int, np.ndarray] = {}  # ReLU6 upper bounds per channel, by activation node
        for _ in range(self.options.iterations):
            for pair in pairs:
                scale = _equalize(graph, pair)
                if pair.activation.op_type == "Clip":
                    key = id(pair.activation)
                    bounds[key] = bounds.get(key, np.full(scale.shape, _clip_max(pair.activation))) / scale
        for pair in pairs:
            if id(pair.activation) in bounds:
                _per_channel_clip(graph, pair.activation, bounds[id(pair.activation)])
        equalized = [{"pair": pair.name, "range_ratio_before": round(before[pair.name], 2),
                      "range_ratio_after": round(_imbalance(pair), 2)} for pair in pairs]
        return PassOutcome(True, {"equalized": equalized, "refused": refused})


def _pairs(graph: ir.Graph) -> tuple[list[_Pair], dict[str, str]]:
    """The Conv -> ReLU/ReLU6 -> Conv chains whose middle tensors nothing else reads, and why others were not taken."""
    convs = {id(conv.node): conv for conv in find_convolutions(graph)}
    pairs, refused = [], {}
    for conv in convs.values():
        readers = [use.node for use in conv.output.uses()]
        if len(readers) != 1 or conv.output.is_graph_output() or readers[0].op_type not in HOMOGENEOUS:
            continue
        activation = readers[0]
        reason = _activation_refusal(activation)
        after = [use.node for use in activation.outputs[0].uses()]
        if reason is None and (len(after) != 1 or activation.outputs[0].is_graph_output()):
            reason = "the activation's output is read by more than one node"
        if reason is None and (id(after[0]) not in convs or after[0].inputs[0] is not activation.outputs[0]):
            reason = f"the activation feeds {after[0].op_type}, not a convolution's input"
        if reason is None and (convs[id(after[0])].in_channels != conv.kernel_shape[0]
                               or (convs[id(after[0])].groups > 1 and not convs[id(after[0])].depthwise)):
            reason = "the second convolution is grouped (not depthwise): its channels do not pair one to one"
        if reason is None and conv.groups > 1 and not conv.depthwise:
            reason = "the first convolution is grouped (not depthwise)"
        if reason is None and any(constant_array(v) is None for v in conv.node.inputs[2:] if v is not None):
            reason = "the first convolution's bias is not a constant"
        if reason is not None:
            refused[f"{conv.name} -> {activation.op_type}"] = reason
            continue
        pairs.append(_Pair(conv, activation, convs[id(after[0])]))
    return pairs, refused


def _activation_refusal(node: ir.Node) -> str | None:
    if node.op_type == "Relu":
        return None
    low = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    high = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if low is None or high is None or float(low) != 0.0 or float(high) <= 0.0:
        return "a Clip other than ReLU6-like Clip(0, max) is not positively homogeneous"
    return None


def _clip_max(node: ir.Node) -> float:
    return float(constant_array(node.inputs[2]))


def _kernel(conv: Convolution) -> np.ndarray:
    """The kernel as it is now (a neighbouring pair may have rescaled it since the pair was found)."""
    return constant_array(conv.node.inputs[1])


def _output_ranges(conv: Convolution) -> np.ndarray:
    weight = _kernel(conv)
    return np.abs(weight).reshape(weight.shape[0], -1).max(axis=1).astype(np.float64)


def _input_ranges(conv: Convolution) -> np.ndarray:
    weight = np.abs(_kernel(conv))
    if conv.depthwise:
        return weight.reshape(weight.shape[0], -1).max(axis=1).astype(np.float64)
    return weight.transpose(1, 0, *range(2, weight.ndim)).reshape(weight.shape[1], -1).max(axis=1).astype(np.float64)


def _imbalance(pair: _Pair) -> float:
    """Mean over channels of max(r1/r2, r2/r1) after normalizing each side by its own max: 1 is balanced."""
    r1, r2 = _output_ranges(pair.first), _input_ranges(pair.second)
    r1, r2 = r1 / max(r1.max(), 1e-30), r2 / max(r2.max(), 1e-30)
    ratio = np.maximum(r1, 1e-12) / np.maximum(r2, 1e-12)
    return float(np.mean(np.maximum(ratio, 1 / ratio)))


def _equalize(graph: ir.Graph, pair: _Pair) -> np.ndarray:
    """Rescale one pair in place (new initializers); returns ``s`` (Conv1's channels were divided by it)."""
    r1, r2 = _output_ranges(pair.first), _input_ranges(pair.second)
    scale = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
    first, second = pair.first, pair.second
    w1 = _kernel(first).astype(np.float64)
    view = (-1,) + (1,) * (w1.ndim - 1)
    _set_input(graph, first, 1, (w1 / scale.reshape(view)).astype(np.float32), "equalized")
    if len(first.node.inputs) > 2 and first.node.inputs[2] is not None:
        b1 = constant_array(first.node.inputs[2]).astype(np.float64)
        _set_input(graph, first, 2, (b1 / scale).astype(np.float32), "equalized_bias")
    w2 = _kernel(second).astype(np.float64)
    if second.depthwise:
        w2 = w2 * scale.reshape(view)
    else:
        w2 = w2 * scale.reshape((1, -1) + (1,) * (w2.ndim - 2))
    _set_input(graph, second, 1, w2.astype(np.float32), "equalized")
    return scale


def _set_input(graph: ir.Graph, conv: Convolution, index: int, array: np.ndarray, label: str) -> None:
    old = conv.node.inputs[index]
    base = re.sub(r"_equalized(_bias)?(_\d+)?$", "", old.name or conv.name)
    conv.node.replace_input_with(index, add_initializer(graph, f"{base}_{label}", array))
    release_if_unused(graph, old)


def _per_channel_clip(graph: ir.Graph, clip: ir.Node, bound: np.ndarray) -> None:
    """``Clip(x, 0, m)`` as ``Min(Relu(x), bound)`` with one bound per channel (axis 1)."""
    rank = len(clip.inputs[0].shape) if clip.inputs[0].shape is not None else 4
    values = bound.astype(np.float32).reshape((1, -1) + (1,) * (rank - 2))
    relu = ir.node("Relu", [clip.inputs[0]], name=unique_node_name(graph, f"{clip.name}_relu"))
    bound_value = add_initializer(graph, f"{clip.name}_channel_max", values)
    minimum = ir.node("Min", [relu.outputs[0], bound_value], name=unique_node_name(graph, f"{clip.name}_min"))
    replace_node(graph, clip, [relu, minimum], minimum.outputs[0])
