"""Absorb a channel transform of a region into its weights: the algebra every transform pass shares.

For sinks ``y = x W + b`` (``W`` stored ``[C_in, C_out]``) reading ``x' = (x - z) T``::

    y = x' (T^-1 W) + (b + z W)

so sinks get ``W' = T^-1 W``, ``b' = b + z W`` and the producer is changed to emit
``x'``. ``T`` is ``diag(1/s)`` (smooth, shift's scaling) or an orthogonal ``Q`` (rotate,
``Q^-1 = Q^T``). An online Hadamard node cannot change what it emits, so behind one
the transform goes into a per-channel ``y * m + c`` after it (a Mul and/or an Add,
created the first time a scale or shift needs one, rewritten in place afterwards: one
elementwise op online per region for a scale or a shift, two for both). Uses of the
producer's output outside the region get a compensating ``x = x' * s + z`` node, so
they still see ``x``. Weights are rewritten copy-on-write:
an initializer that something outside the rewrite also reads (tied embeddings, an
exporter's de-duplicated constants) is duplicated first, never changed in place, and
the duplication is recorded.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.linears import Linear, constant_array
from qcompiler.analysis.regions import OnlineAffine, Region, Sink
from qcompiler.graph import (add_initializer, insert_after_producer, interpose, redirect_uses, release_if_unused,
                             unique_node_name)

Notes = list[str]
OUTPUT_TRANSFORMED = "qcompiler.output_transformed"
# On the elementwise Mul/Add a transform inserts where no weight could absorb it (outside readers of a region's
# source, the identity ops behind an online Hadamard): graph nodes the source architecture has no parameter for.
COMPENSATION = "qcompiler.compensation"
# Scales beyond these would trade an activation outlier for a float32 precision problem.
SCALE_LIMITS = (1e-5, 1e5)


def rewrite_constant(graph: ir.Graph, node: ir.Node, index: int, change: Callable[[np.ndarray], np.ndarray],
                     notes: Notes) -> None:
    """Replace input ``index`` of ``node`` (a constant) by ``change(old)``, duplicating it if it is shared."""
    value = node.inputs[index]
    old = constant_array(value)
    if old is None:
        raise ValueError(f"input {index} of {node.name} is not a constant")
    new = np.ascontiguousarray(change(old.astype(np.float64)).astype(old.dtype))
    private = (value.const_value is not None and value.name in graph.initializers and len(value.uses()) == 1
               and not value.is_graph_output() and not value.is_graph_input())
    if private:
        value.const_value = ir.tensor(new, name=value.name)
        return
    if len(value.uses()) > 1:
        notes.append(f"weight '{value.name}' is shared outside {node.name or node.op_type}: duplicated before rewriting")
    node.replace_input_with(index, add_initializer(graph, value.name or f"{node.name}_const", new))
    release_if_unused(graph, value)


def mark_output_transformed(linear: Linear, pass_name: str) -> None:
    """Record on a linear that its output is now transformed, so per-layer comparisons with the source skip it."""
    mark_node_output_transformed(linear.matmul, pass_name)


def mark_node_output_transformed(node: ir.Node, pass_name: str) -> None:
    """`mark_output_transformed` for any layer node (a Conv that absorbed a scale)."""
    previous = node.metadata_props.get(OUTPUT_TRANSFORMED)
    node.metadata_props[OUTPUT_TRANSFORMED] = f"{previous},{pass_name}" if previous else pass_name


def set_optional_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give ``node`` a constant at input ``index`` (LayerNorm beta when it had none)."""
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, add_initializer(graph, f"{node.name or node.op_type}_input{index}", array))


def sink_rows(sink: Sink, vector: np.ndarray) -> np.ndarray:
    """A producer-channel vector seen in the sink's input channels."""
    return vector[sink.channel_map]


def ensure_bias(graph: ir.Graph, linear: Linear, dtype: np.dtype) -> Linear:
    """The linear with a bias ``Add`` (a zero bias is created when it had none)."""
    if linear.bias_add is not None:
        return linear
    output = linear.matmul.outputs[0]
    bias = add_initializer(graph, f"{linear.name}_bias", np.zeros(linear.out_features, dtype))
    add = ir.node("Add", [output, bias], name=unique_node_name(graph, f"{linear.name}_bias"))
    interpose(graph, output, add, take_name=True)
    return Linear(linear.matmul, linear.weight, add, bias)


def transform_sinks(graph: ir.Graph, region: Region, inverse_rows: Callable[[Sink, np.ndarray], np.ndarray],
                    shift: np.ndarray | None, notes: Notes) -> None:
    """``W' = T^-1 W`` via ``inverse_rows`` and ``b' = b + z W`` (with the original ``W``) for every sink."""
    for i, sink in enumerate(region.sinks):
        linear = sink.linear
        weight = constant_array(linear.weight)
        if shift is not None and np.any(shift):
            linear = ensure_bias(graph, linear, weight.dtype)
            region.sinks[i] = sink = Sink(linear, sink.channel_map)
            correction = sink_rows(sink, shift).astype(np.float64) @ weight.astype(np.float64)
            _rewrite_bias(graph, linear, lambda b: b + correction.reshape(b.shape), notes)
        rewrite_constant(graph, linear.matmul, 1, lambda w: inverse_rows(sink, w), notes)


def _rewrite_bias(graph: ir.Graph, linear: Linear, change: Callable[[np.ndarray], np.ndarray], notes: Notes) -> None:
    add = linear.bias_add
    index = next(i for i, v in enumerate(add.inputs) if v is linear.bias)
    rewrite_constant(graph, add, index, change, notes)


def absorb_affine(graph: ir.Graph, region: Region, scale: np.ndarray | None, shift: np.ndarray | None,
                  notes: Notes) -> None:
    """Make the region's producer emit ``(x - z) / s`` and rewrite sinks and outside readers to match."""
    channels = region.channels
    s = np.ones(channels) if scale is None else scale.astype(np.float64)
    z = None if shift is None or not np.any(shift) else shift.astype(np.float64)
    if region.online is not None:
        region.source = _online_ops(graph, region.online, scale is not None, z is not None)
    _compensate_foreign(graph, region, s if scale is not None else None, z)
    transform_sinks(graph, region, lambda sink, w: w * sink_rows(sink, s)[:, None], z, notes)
    producer = region.producer
    offset = np.zeros(channels) if z is None else z
    if region.online is not None:
        # y * m + c becomes ((y * m + c) - z) / s = y * (m / s) + (c - z) / s.
        if region.online.mul is not None:
            rewrite_constant(graph, region.online.mul, 1, lambda m: m / s, notes)
        if region.online.add is not None:
            rewrite_constant(graph, region.online.add, 1, lambda c: (c - offset) / s, notes)
        return
    if region.kind in ("layernorm", "rmsnorm"):
        rewrite_constant(graph, producer, 1, lambda gamma: gamma / s, notes)
        has_beta = len(producer.inputs) > 2 and producer.inputs[2] is not None
        if z is not None and not has_beta:
            set_optional_constant(graph, producer, 2, np.zeros(channels, constant_array(producer.inputs[1]).dtype))
        if z is not None or has_beta:
            rewrite_constant(graph, producer, 2, lambda beta: (beta - offset) / s, notes)
        return
    absorber = region.absorber
    weight = constant_array(absorber.weight)
    if z is not None:
        absorber = ensure_bias(graph, absorber, weight.dtype)
    rewrite_constant(graph, absorber.matmul, 1, lambda w: w / s[None, :], notes)
    mark_output_transformed(absorber, "scale/shift")
    if absorber.bias is not None:
        _rewrite_bias(graph, absorber, lambda b: ((b.reshape(-1) - offset) / s).reshape(b.shape), notes)


def _online_ops(graph: ir.Graph, online: OnlineAffine, scale: bool, shift: bool) -> ir.Value:
    """Give the Hadamard node the Mul (for a scale) and Add (for a shift) it lacks, as identities; the new output."""
    value = online.hadamard.outputs[0]
    a, b = online.hadamard.inputs[1:3]  # x @ (A kron B): the factors' sizes multiply to the channel count
    channels = constant_array(a).shape[0] * constant_array(b).shape[0]
    dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.float32
    if scale and online.mul is None:
        online.mul = _insert_elementwise(graph, "Mul", value, np.ones(channels, dtype), "scaled")
    if shift and online.add is None:
        online.add = _insert_elementwise(graph, "Add", online.output, np.zeros(channels, dtype), "shifted")
    return online.output


def _insert_elementwise(graph: ir.Graph, op: str, value: ir.Value, vector: np.ndarray, suffix: str) -> ir.Node:
    """``op(value, vector)`` right after ``value``'s producer, read by every former reader of ``value``."""
    name = unique_node_name(graph, f"{value.name}_{suffix}")
    node = ir.node(op, [value, add_initializer(graph, f"{name}_vector", vector)], name=name)
    node.metadata_props[COMPENSATION] = suffix
    node.outputs[0].name = name
    interpose(graph, value, node)
    return node


def _compensate_foreign(graph: ir.Graph, region: Region, s: np.ndarray | None, z: np.ndarray | None) -> None:
    """Outside readers of the source get ``x' * s + z`` back: one Mul and/or Add, elementwise."""
    compensate_readers(graph, region.source, region.foreign, s, z)
    region.foreign = []


def compensate_readers(graph: ir.Graph, source: ir.Value, readers: list[ir.Node | None], s: np.ndarray | None,
                       z: np.ndarray | None, channel_view: tuple[int, ...] = (-1,)) -> None:
    """Give ``readers`` of a transformed ``source`` (``None``: it is a graph output) ``x' * s + z`` instead.

    ``channel_view`` shapes the vectors against the source (``(1, -1, 1, 1)`` for NCHW).
    """
    if not readers or (s is None and z is None):
        return
    dtype = np.dtype(source.dtype.numpy()) if source.dtype is not None else np.float32
    nodes, value = [], source
    if s is not None:
        vector = s.astype(dtype).reshape(channel_view)
        nodes.append(ir.node("Mul", [value, add_initializer(graph, f"{source.name}_unscale", vector)],
                             name=unique_node_name(graph, f"{source.name}_unscale")))
        value = nodes[-1].outputs[0]
    if z is not None:
        vector = z.astype(dtype).reshape(channel_view)
        nodes.append(ir.node("Add", [value, add_initializer(graph, f"{source.name}_unshift", vector)],
                             name=unique_node_name(graph, f"{source.name}_unshift")))
        value = nodes[-1].outputs[0]
    value.shape, value.type = source.shape, source.type
    for node in nodes:
        node.metadata_props[COMPENSATION] = "outside readers"
    insert_after_producer(graph, source, nodes)
    redirect_uses(graph, source, value, readers=[n for n in readers if n is not None], graph_output=None in readers)
