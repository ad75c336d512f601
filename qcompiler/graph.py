"""Small graph-editing helpers that onnx_ir does not provide."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer with a name not yet used in ``graph``."""
    existing = graph.initializers
    unique, suffix = name, 1
    while unique in existing:
        unique, suffix = f"{name}_{suffix}", suffix + 1
    value = ir.Value(name=unique, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=unique))
    graph.register_initializer(value)
    return value


def replace_graph_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Make ``new`` the graph output ``old`` was, under ``old``'s name (``old`` is renamed)."""
    outputs = graph.outputs
    position = next(i for i, v in enumerate(outputs) if v is old)
    name = old.name
    old.name = f"{name}_inner"
    outputs[position] = new
    new.name = name


def unique_node_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_N`` when a node of ``graph`` already has that name (ONNX requires unique names)."""
    taken = {node.name for node in graph}
    unique, suffix = base, 1
    while unique in taken:
        unique, suffix = f"{base}_{suffix}", suffix + 1
    return unique
