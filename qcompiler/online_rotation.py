"""The online rotation node: ``qcompiler.Hadamard(x, A, B) = x @ (A kron B)`` along the last axis.

Where no producer can absorb a rotation, rotate inserts this node in front of the
sinks (QuaRot's online Hadamard before down_proj). It is an ONNX model-local function,
so any runtime that runs ONNX runs it; its body is the Kronecker-factored product, with
each row of ``x`` viewed as an ``[a, b]`` matrix ``X``::

    X @ (A kron B)  =  A^T X B        (per row: a + b multiply-adds per element, not n)

computed as a MatMul of ``A^T`` broadcast over the rows and one MatMul by ``B``: no
Transpose of the activation (onnxruntime's transposes cost more than the products).
Backends recognise the op by domain and name and may lower it to a fast Walsh-Hadamard
kernel or regroup its factors (`balance_factors`); ``A`` and ``B`` are ordinary
initializers (normalized Hadamard factors, shared by every node of the same size).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir

from qcompiler.graph import add_initializer, drop_unused, insert_after_producer, unique_node_name
from qcompiler.hadamard import Factor, factor_matrix, is_sylvester, rotation_plan

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
    left = add("MatMul", [add("Transpose", [a], perm=[1, 0]), grouped])  # [a, a] x [rows, a, b]: A^T X per row
    y = add("Reshape", [add("MatMul", [left, b]), shape])
    y.name = "y"
    graph = ir.Graph([x, a, b], [y], nodes=nodes, opset_imports={"": 23}, name=OP)
    return ir.Function(DOMAIN, OP, graph=graph, attributes=[])


def insert_hadamard(model: ir.Model, value: ir.Value, channels: int, seed: int = 0) -> ir.Node:
    """A Hadamard node rotating the last axis (``channels`` wide) of ``value``, right after its producer."""
    graph = model.graph
    a, b = factor_pair(channels, seed)
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    a_value = _shared_factor(graph, f"hadamard_{channels}_a", a.astype(dtype))
    b_value = _shared_factor(graph, f"hadamard_{channels}_b", b.astype(dtype))
    return insert_kronecker(model, value, a_value, b_value, "hadamard", "rotated")


def insert_kronecker(model: ir.Model, value: ir.Value, a: ir.Value, b: ir.Value, label: str, suffix: str) -> ir.Node:
    """The node computing ``value @ (a kron b)`` on the last axis (any factors: affine learns its own)."""
    key = (DOMAIN, OP, "")
    if key not in model.functions:
        model.functions[key] = _function()
        model.opset_imports.setdefault(DOMAIN, 1)
    graph = model.graph
    node = ir.node(OP, [value, a, b], domain=DOMAIN, name=unique_node_name(graph, f"{value.name}_{label}"))
    node.outputs[0].name = f"{value.name}_{suffix}"
    node.outputs[0].shape, node.outputs[0].type = value.shape, value.type
    insert_after_producer(graph, value, node)
    return node


def balance_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same ``A kron B`` as a pair of sizes near ``sqrt(n)``, for runtimes that multiply both densely.

    ``factor_pair`` keeps the whole Sylvester part in ``A`` (what a butterfly kernel wants:
    1536 = H_128 x H_12). A dense product costs ``a + b`` per element, least when the sizes
    are balanced; a Sylvester ``A = H_u kron H_v`` exactly, so ``A kron B = H_u kron (H_v kron B)``
    (1536: 32 x 48, 80 multiply-adds per element instead of 140).
    """
    size, other = a.shape[0], b.shape[0]
    if not is_sylvester(a):
        return a, b
    u = min((1 << k for k in range(size.bit_length())), key=lambda u: (u + size // u * other, -u))
    if u == size:
        return a, b
    moved = factor_matrix(Factor("sylvester", size // u), 0).astype(b.dtype)
    return factor_matrix(Factor("sylvester", u), 0).astype(a.dtype), np.kron(moved, b)


def balance_rotations(model: ir.Model) -> int:
    """Give every Hadamard node of ``model`` balanced factors (`balance_factors`); how many changed."""
    graph, changed = model.graph, 0
    for node in graph:
        if (node.domain, node.op_type) != (DOMAIN, OP) or not all(v.const_value is not None for v in node.inputs[1:]):
            continue
        a, b = (v.const_value.numpy() for v in node.inputs[1:])
        new_a, new_b = balance_factors(a, b)
        if new_a.shape == a.shape:
            continue
        n = a.shape[0] * b.shape[0]
        node.replace_input_with(1, _shared_factor(graph, f"hadamard_{n}_{new_a.shape[0]}x{new_b.shape[0]}_a", new_a))
        node.replace_input_with(2, _shared_factor(graph, f"hadamard_{n}_{new_a.shape[0]}x{new_b.shape[0]}_b", new_b))
        changed += 1
    drop_unused(graph)
    return changed


def _shared_factor(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    existing = graph.initializers.get(name)
    if existing is not None and np.array_equal(existing.const_value.numpy(), array):
        return existing
    return add_initializer(graph, name, array)
