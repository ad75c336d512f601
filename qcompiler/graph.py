"""Graph edits that onnx_ir does not provide, written once for every pass and lowering.

Each keeps the invariants that are easy to break by hand: a node goes in right after the
producer of what it reads (or first, for a graph input or initializer); uses move
together with the graph outputs they feed, and a graph output keeps its name, since
that name is the model's interface; a replaced node's output hands its name, shape,
type and metadata to its replacement.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators


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


def unique_value_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_N`` when a value of ``graph`` already has that name (a value is defined once in ONNX)."""
    taken = {v.name for v in graph.inputs} | set(graph.initializers) | {o.name for n in graph for o in n.outputs}
    unique, suffix = base, 1
    while unique in taken:
        unique, suffix = f"{base}_{suffix}", suffix + 1
    return unique


def insert_after_producer(graph: ir.Graph, value: ir.Value, nodes: ir.Node | Sequence[ir.Node]) -> None:
    """Insert ``nodes`` (which read ``value``) right after its producer, or first when it has none."""
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, nodes)
    else:
        graph.insert_before(next(iter(graph)), nodes)


def redirect_uses(graph: ir.Graph, old: ir.Value, new: ir.Value, *, readers: Iterable[ir.Node] | None = None,
                  except_node: ir.Node | None = None, graph_output: bool = True) -> None:
    """Make readers of ``old`` read ``new``: all of them, or those in ``readers``, never ``except_node``.

    With ``graph_output``, a graph output ``old`` becomes ``new`` under ``old``'s name.
    """
    chosen = None if readers is None else {id(n) for n in readers}
    for use in list(old.uses()):
        if use.node is not except_node and (chosen is None or id(use.node) in chosen):
            use.node.replace_input_with(use.idx, new)
    if graph_output and old.is_graph_output():
        replace_graph_output(graph, old, new)


def interpose(graph: ir.Graph, value: ir.Value, node: ir.Node, *, take_name: bool = False) -> ir.Value:
    """Put ``node``, which reads ``value``, between ``value`` and everything that read it; returns its output.

    The output gets ``value``'s shape and type, and its name when ``value`` was a graph
    output or with ``take_name`` (``value`` is then renamed ``<name>_inner``).
    """
    result = node.outputs[0]
    result.shape, result.type = value.shape, value.type
    was_output = value.is_graph_output()
    insert_after_producer(graph, value, node)
    redirect_uses(graph, value, result, except_node=node)
    if take_name and not was_output:
        name = value.name
        value.name, result.name = f"{name}_inner", name
    return result


def add_beside(graph: ir.Graph, output: ir.Value, nodes: Sequence[ir.Node], correction: ir.Value,
               name: str) -> ir.Value:
    """Make every reader of ``output`` read ``output + correction``, where ``nodes`` compute ``correction``.

    For float branches beside a linear (low-rank compensation, outlier channels): ``nodes``
    go in after ``output``'s producer, their outputs are float32, and the sum is named
    ``name`` (a graph output keeps its own name).
    """
    add = ir.node("Add", [output, correction], name=unique_node_name(graph, f"{name}_add"))
    result = add.outputs[0]
    result.name = unique_value_name(graph, name)
    for node in nodes:
        for value in node.outputs:
            value.type = ir.TensorType(ir.DataType.FLOAT)
    result.shape, result.type = output.shape, output.type
    graph.insert_after(output.producer(), [*nodes, add])
    redirect_uses(graph, output, result, except_node=add)
    return result


def replace_node(graph: ir.Graph, node: ir.Node, nodes: ir.Node | Sequence[ir.Node],
                 output: ir.Value | None = None) -> None:
    """Put ``nodes`` where ``node`` was; ``output`` (default: the first node's) takes over its single output.

    The new output takes the old one's name, shape, type and uses (graph outputs
    included); the node producing it takes the old node's metadata (the quantize
    annotation, name scopes).
    """
    nodes = [nodes] if isinstance(nodes, ir.Node) else list(nodes)
    new = output if output is not None else nodes[0].outputs[0]
    old = node.outputs[0]
    graph.insert_before(node, nodes)
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    name = old.name
    old.name = f"{name}_replaced"
    new.name, new.shape, new.type = name, old.shape, old.type
    new.producer().metadata_props.update(node.metadata_props)
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


def release_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Drop an initializer nothing reads any more, and let go of its tensor.

    The tensor is released explicitly: something may still hold the value itself (onnx_ir
    1.1's graph inputs keep every former input, see `qcompiler.onnx_ir_workarounds`; a
    region analysed before the rewrite), and with it the old weight.
    """
    if (value.is_initializer() and not value.uses() and not value.is_graph_output()
            and not value.is_graph_input()):
        graph.initializers.pop(value.name)
        value.const_value = None


def drop_unused(graph: ir.Graph) -> None:
    """Remove nodes and initializers that nothing reads any more (what a lowering left behind)."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if all(not output.uses() and not output.is_graph_output() for output in node.outputs):
                graph.remove(node, safe=True)
                changed = True
    for value in list(graph.initializers.values()):
        release_if_unused(graph, value)
