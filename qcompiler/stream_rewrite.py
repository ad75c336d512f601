"""Rewrite a whole residual stream (found by `qcompiler.analysis.residual`): center it, rotate it.

Centering (SliceGPT's LayerNorm -> RMSNorm): every writer subtracts its mean over the
output channels, ``W' = W (I - 11^T/n)``, ``b' = b - mean(b)``, embedding rows likewise,
so the stream is zero-mean and ``LayerNorm(x) = RMSNorm(x)`` with the same epsilon and
gamma (a LayerNorm output does not change when its input loses its mean, so this is
exact before the conversion too). Rotation (QuaRot): writers emit ``w Q``; a plain
RMSNorm commutes (``||x Q|| = ||x||``), so its linears take ``Q^T W``; anything else
reading a rotated value gets it back through one ``MatMul(., Q^T)`` node, marked so
that later passes know it is a compensation, not a layer of the model.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.absorb import Notes, mark_output_transformed, rewrite_constant
from qcompiler.analysis.linears import constant_array
from qcompiler.analysis.residual import Stream
from qcompiler.graph import add_initializer, insert_after_producer, replace_graph_output, replace_node, unique_node_name

UNROTATE = "qcompiler.unrotate"


def center_stream(graph: ir.Graph, stream: Stream, notes: Notes) -> list[str]:
    """Make the stream zero-mean and turn its LayerNorms without beta into RMSNorm; returns the converted norms."""
    for writer in stream.writers:
        for target in writer.targets:
            rewrite_constant(graph, target.node, target.index,
                             lambda a, axis=target.axis: a - a.mean(axis=axis, keepdims=True), notes)
    converted = []
    for reader in stream.readers:
        if reader.kind == "layernorm" and not _has_beta(reader.node):
            old = reader.node.outputs[0]
            reader.node, reader.kind = _to_rmsnorm(graph, reader.node), "rmsnorm"
            for exposure in reader.exposed:
                exposure.value = reader.node.outputs[0] if exposure.value is old else exposure.value
            converted.append(reader.name)
        elif reader.kind == "layernorm":
            notes.append(f"{reader.name} keeps LayerNorm: its beta is not folded (exact on the centered stream)")
    return converted


def rotate_stream(graph: ir.Graph, stream: Stream, q: np.ndarray, notes: Notes) -> list[str]:
    """Writers emit ``w Q``, readers undo it; returns where a ``Q^T`` MatMul had to be inserted."""
    for writer in stream.writers:
        for target in writer.targets:
            rewrite_constant(graph, target.node, target.index,
                             lambda a, axis=target.axis: np.moveaxis(np.moveaxis(a, axis, -1) @ q, -1, axis), notes)
        if writer.linear is not None:
            mark_output_transformed(writer.linear, "rotate")
    inserted: dict[ir.Value, ir.Value] = {}
    for reader in stream.readers:
        if (reader.kind == "rmsnorm" and reader.plain) or reader.kind == "linear":
            for sink in reader.sinks:
                rewrite_constant(graph, sink.matmul, 1, lambda w: q.T @ w, notes)
            for exposure in reader.exposed:
                _unrotate(graph, exposure.value, exposure.uses, q, inserted)
        else:
            use = (reader.node, _index_of(reader.node, reader.value) if reader.node is not None else 0)
            _unrotate(graph, reader.value, [use], q, inserted)
    return [f"{restored.producer().name} for {_readers_of(restored)}" for restored in inserted.values()]


def _unrotate(graph: ir.Graph, value: ir.Value, uses: list[tuple[ir.Node | None, int]], q: np.ndarray,
              inserted: dict[ir.Value, ir.Value]) -> None:
    """Route ``uses`` of the rotated ``value`` through ``MatMul(value, Q^T)`` (one node per value)."""
    restored = inserted.get(value)
    if restored is None:
        dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.float32
        matrix = add_initializer(graph, f"{value.name}_unrotate", np.ascontiguousarray(q.T).astype(dtype))
        node = ir.node("MatMul", [value, matrix], name=unique_node_name(graph, f"{value.name}_unrotate"))
        node.metadata_props[UNROTATE] = "rotate"
        restored = node.outputs[0]
        restored.shape, restored.type, restored.name = value.shape, value.type, f"{value.name}_unrotated"
        insert_after_producer(graph, value, node)
        inserted[value] = restored
    for user, index in uses:
        if user is None:
            replace_graph_output(graph, value, restored)
        else:
            user.replace_input_with(index, restored)


def _readers_of(value: ir.Value) -> str:
    names = [use.node.name or use.node.op_type for use in value.uses()]
    return ", ".join(names + (["the graph output"] if value.is_graph_output() else []))


def _has_beta(norm: ir.Node) -> bool:
    beta = constant_array(norm.inputs[2]) if len(norm.inputs) > 2 and norm.inputs[2] is not None else None
    return len(norm.inputs) > 2 and norm.inputs[2] is not None and (beta is None or bool(np.any(beta)))


def _to_rmsnorm(graph: ir.Graph, norm: ir.Node) -> ir.Node:
    """``RMSNormalization(x, gamma)`` in place of ``LayerNormalization(x, gamma[, 0])``, same axis and epsilon."""
    attributes = {key: norm.attributes[key].value for key in ("axis", "epsilon", "stash_type") if key in norm.attributes}
    rms = ir.node("RMSNormalization", [norm.inputs[0], norm.inputs[1]], attributes=attributes, name=norm.name)
    replace_node(graph, norm, rms)
    return rms


def _index_of(node: ir.Node, value: ir.Value) -> int:
    return next(i for i, v in enumerate(node.inputs) if v is value)
