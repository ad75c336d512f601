"""The online rotation node: ``qcompiler.Hadamard(x, A, B) = x @ (A kron B)`` along the last axis.

Where no producer can absorb a rotation, rotate inserts this node in front of the
sinks (QuaRot's online Hadamard before down_proj). It is an ONNX model-local function,
so any runtime that runs ONNX runs it; its body is the Kronecker-factored product
(``X`` as ``[N, a, b]``, ``A^T X B``), costing ``O(n (a + b))`` per row instead of the
``O(n^2)`` of a dense matmul. Backends recognise the op by domain and name and may
lower it to a fast Walsh-Hadamard kernel; ``A`` and ``B`` are ordinary initializers
(normalized Hadamard factors, shared by every node of the same size).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir

from qcompiler.graph import add_initializer, insert_after_producer, unique_node_name
from qcompiler.hadamard import Factor, factor_matrix, rotation_plan

DOMAIN = "qcompiler"
OP = "Hadamard"


def factor_pair(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B)`` with ``A kron B`` the normalized rotation of size ``n`` (``B`` is the last factor).

    A lone Sylvester factor (``n`` a power of two) is split as ``H_n = H_a kron H_b`` with
    ``a, b`` about ``sqrt(n)``: the same matrix, but ``n (a + b)`` work per row instead of the
    ``n^2`` of one dense ``B`` (for 4096 channels, 128 against 4096 multiply-adds per channel).
    """
    factors = rotation_plan(n).factors
    if len(factors) == 1 and factors[0].kind == "sylvester" and n > 2:
        b = 1 << ((n.bit_length()) // 2)
        return factor_matrix(Factor("sylvester", n // b), seed), factor_matrix(Factor("sylvester", b), seed)
    matrices = [factor_matrix(f, seed) for f in factors]
    first = functools.reduce(np.kron, matrices[:-1], np.ones((1, 1)))
    return first, matrices[-1]


def rotate_last_axis(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``x @ (A kron B)`` without forming the Kronecker product."""
    lead = x.shape[:-1]
    y = x.reshape(-1, a.shape[0], b.shape[0])
    y = np.einsum("nij,ik,jl->nkl", y, a, b, optimize=True)
    return y.reshape(*lead, a.shape[0] * b.shape[0])


def _function() -> ir.Function:
    x = ir.Value(name="x")
    a = ir.Value(name="A")
    b = ir.Value(name="B")
    nodes = []

    def add(op: str, inputs: list[ir.Value], **attrs) -> ir.Value:
        node = ir.node(op, inputs, attributes=attrs)
        nodes.append(node)
        return node.outputs[0]

    shape = add("Shape", [x])
    minus_one = add("Constant", [], value=ir.tensor(np.array([-1], np.int64)))
    a_size = add("Shape", [a], start=0, end=1)
    b_size = add("Shape", [b], start=0, end=1)
    grouped = add("Reshape", [x, add("Concat", [minus_one, a_size, b_size], axis=0)])
    right = add("Transpose", [add("MatMul", [grouped, b])], perm=[0, 2, 1])
    both = add("Transpose", [add("MatMul", [right, a])], perm=[0, 2, 1])
    y = add("Reshape", [both, shape])
    y.name = "y"
    graph = ir.Graph([x, a, b], [y], nodes=nodes, opset_imports={"": 23}, name=OP)
    return ir.Function(DOMAIN, OP, graph=graph, attributes=[])


def insert_hadamard(model: ir.Model, value: ir.Value, channels: int, seed: int = 0) -> ir.Node:
    """A Hadamard node rotating the last axis (``channels`` wide) of ``value``, right after its producer."""
    key = (DOMAIN, OP, "")
    if key not in model.functions:
        model.functions[key] = _function()
        model.opset_imports.setdefault(DOMAIN, 1)
    graph = model.graph
    a, b = factor_pair(channels, seed)
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    a_value = _shared_factor(graph, f"hadamard_{channels}_a", a.astype(dtype))
    b_value = _shared_factor(graph, f"hadamard_{channels}_b", b.astype(dtype))
    node = ir.node(OP, [value, a_value, b_value], domain=DOMAIN, name=unique_node_name(graph, f"{value.name}_hadamard"))
    node.outputs[0].name = f"{value.name}_rotated"
    node.outputs[0].shape, node.outputs[0].type = value.shape, value.type
    insert_after_producer(graph, value, node)
    return node


def _shared_factor(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    existing = graph.initializers.get(name)
    if existing is not None and np.array_equal(existing.const_value.numpy(), array):
        return existing
    return add_initializer(graph, name, array)
