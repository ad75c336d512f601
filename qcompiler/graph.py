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


def swap_node(graph: ir.Graph, node: ir.Node, replacement: ir.Node) -> None:
    """Put ``replacement`` where ``node`` was: its output takes the old output's name, uses and metadata."""
    graph.insert_before(node, replacement)
    old = node.outputs[0]
    new = replacement.outputs[0]
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    name = old.name
    old.name = f"{name}_replaced"
    new.name, new.shape, new.type = name, old.shape, old.type
    replacement.metadata_props.update(node.metadata_props)
    graph.remove(node, safe=True)


def value_named(graph: ir.Graph, name: str) -> ir.Value:
    """The graph input or node output called ``name`` (annotations refer to values by name)."""
    for value in graph.inputs:
        if value.name == name:
            return value
    for node in graph:
        for output in node.outputs:
            if output.name == name:
                return output
    raise ValueError(f"the graph has no value named '{name}'")


def drop_unused(graph: ir.Graph) -> None:
    """Remove nodes and initializers that nothing reads any more (what a lowering left behind)."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if all(not output.uses() and not output.is_graph_output() for output in node.outputs):
                graph.remove(node, safe=True)
                changed = True
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        graph.initializers.pop(name)
