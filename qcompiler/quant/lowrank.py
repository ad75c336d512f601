"""Low-rank compensation: a thin float matmul beside a quantized one that carries back the rounding's main error.

A quantized linear computes ``x Q(W)`` instead of ``x W``; the error ``E = W - Q(W)``
(``[K, N]``) is full rank, but most of what it does to the outputs lies in a few
directions, and ``y = x Q(W) + (x A) B`` with ``A [K, r]``, ``B [r, N]`` costs ``r (K + N)``
multiply-adds and parameters per token beside ``K N``.

- LoRC (ZeroQuant-V2): the best rank-r approximation of ``E`` itself, by SVD.
- EoRA: the best one for the outputs, ``min ||X (E - A B)||_F`` over the calibration
  inputs. With ``X^T X = Q L Q^T`` and ``G = L^(1/2) Q^T`` (so ``||X M|| = ||G M||``), it is
  the SVD of ``G E`` truncated to rank r and mapped back by ``G^-1 = Q L^(-1/2)``. Outlier
  channels, where rounding error meets large activations, are where the correction goes.

The singular values are split evenly (``A = U S^(1/2)``, ``B = S^(1/2) V^T``) so both factors
have the same range, which matters when they are stored in fp16 or int8.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.graph import add_beside, add_initializer, unique_node_name
from qcompiler.quant.spec import QuantSpec, quantize

Storage = Literal["fp16", "int8"]
KEY = "qcompiler.lowrank"  # marks the branch's MatMuls: float by design, never a linear to quantize
# Dampening of X^T X, as a fraction of its mean diagonal, before EoRA inverts its square root: directions the
# calibration never excited would otherwise be amplified without bound.
EORA_DAMP = 0.01
INT8_FACTOR = QuantSpec("int8", "channel")


def lorc_factors(error: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``A [K, r]``, ``B [r, N]`` with ``A B`` the best rank-r approximation of ``error`` in Frobenius norm."""
    u, s, vt = np.linalg.svd(np.asarray(error, np.float64), full_matrices=False)
    return _split(u[:, :rank], s[:rank], vt[:rank])


def eora_factors(error: np.ndarray, hessian: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``A [K, r]``, ``B [r, N]`` minimising ``||X (error - A B)||_F`` for ``hessian = X^T X``."""
    h = np.array(hessian, np.float64)
    h[np.diag_indices(len(h))] += EORA_DAMP * max(float(np.mean(np.diag(h))), 1e-12)
    eigenvalues, q = np.linalg.eigh(h)
    root = np.sqrt(np.maximum(eigenvalues, 0.0))
    u, s, vt = np.linalg.svd((root[:, None] * q.T) @ np.asarray(error, np.float64), full_matrices=False)
    return _split((q / root[None, :]) @ u[:, :rank], s[:rank], vt[:rank])


def _split(u: np.ndarray, s: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    root = np.sqrt(s)
    return (u * root[None, :]).astype(np.float32), (root[:, None] * vt).astype(np.float32)


def stored(factor: np.ndarray, storage: Storage) -> np.ndarray:
    """The factor as the artifact computes with it (fp16 or per-column int8, back in float32)."""
    if storage == "fp16":
        return factor.astype(np.float16).astype(np.float32)
    return quantize(factor, INT8_FACTOR, "weight").dequantize()


def add_branch(graph: ir.Graph, source: ir.Value, output: ir.Value, a: np.ndarray, b: np.ndarray,
               storage: Storage, name: str) -> int:
    """Add ``(source A) B`` to ``output`` for every reader of ``output``; returns the bytes the factors take.

    The branch reads the float input (before any activation quantizer), so the correction
    is not rounded twice, and is added after the bias, which keeps the linear's
    ``MatMul -> Add(bias)`` pattern intact for the lowerings.
    """
    nodes: list[ir.Node] = []

    def factor(label: str, matrix: np.ndarray) -> ir.Value:
        # Cast (and Mul by the column scales), not DequantizeLinear: onnxruntime would fuse DequantizeLinear +
        # MatMul into an 8-bit kernel that also rounds the input. Both fold into a float32 constant at load.
        if storage == "fp16":
            value = add_initializer(graph, f"{name}_{label}", matrix.astype(np.float16))
        else:
            q = quantize(matrix, INT8_FACTOR, "weight")
            value = add_initializer(graph, f"{name}_{label}_quantized", q.codes())
        nodes.append(ir.node("Cast", [value], attributes={"to": ir.DataType.FLOAT},
                             name=unique_node_name(graph, f"{name}_{label}_cast")))
        if storage == "int8":
            scale = add_initializer(graph, f"{name}_{label}_scale", q.scale.astype(np.float32))
            nodes.append(ir.node("Mul", [nodes[-1].outputs[0], scale],
                                 name=unique_node_name(graph, f"{name}_{label}_scaled")))
        return nodes[-1].outputs[0]

    def matmul(left: ir.Value, right: ir.Value, label: str) -> ir.Value:
        node = ir.node("MatMul", [left, right], name=unique_node_name(graph, f"{name}_{label}"))
        node.metadata_props[KEY] = "low-rank compensation branch"
        nodes.append(node)
        return node.outputs[0]

    down = matmul(source, factor("lowrank_a", a), "lowrank_down")
    correction = matmul(down, factor("lowrank_b", b), "lowrank_up")
    add_beside(graph, output, nodes, correction, f"{name}_compensated")
    bytes_per = 2 if storage == "fp16" else 1
    return int((a.size + b.size) * bytes_per + (0 if storage == "fp16" else 4 * (a.shape[1] + b.shape[1])))
