"""An int8 x int8 -> int32 matmul with a float epilogue for CPUs with AVX-512 VNNI, written in TIR.

``Y = X @ W`` for W8A8 linears: ``W`` is int8 codes ``[K, N]`` with one scale per output column;
``X`` arrives already quantized as uint8 codes (``q + 128`` for symmetric int8 activations,
``q + 128`` with ``q`` the asymmetric int8 code for static ones) with one scale per row (per
token) or one for all rows (per tensor, repeated). The math, in two lines::

    acc[m, n] = sum_k xu8[m, k] * W[k, n]                           (exact, int32)
    Y[m, n]   = s_row[m] * s_col[n] * (acc[m, n] - zu8 * colsum[n])  (zu8: the codes' zero point)

The correction ``zu8 * colsum[n]`` is precomputed per column, so the inner loop is the bare
``vpdpbusd`` instruction: four adjacent uint8 activations times four int8 weights, summed into
each of 16 int32 lanes. One activation quadruple is broadcast to all lanes and multiplied with
four weight vectors (64 columns); four rows share the weight vectors, so a register tile is
4 rows x 64 columns (16 accumulators), or M rows when M < 4 (a GEMV computes no discarded rows).

Storage layout (`pack_weights`; T = 64 columns per tile, Q = ceil(K / 4) quadruples)::

    packed  int8    [ceil(N / T), Q, 256]      packed[t, q, 64 j + 4 l + i] = W[4 q + i, T t + 16 j + l]
    zcorr   int32   [ceil(N / T) * T]          zu8 * colsum over the real rows
    scale   float32 [ceil(N / T) * T]

K is padded with zero weights to whole quadruples (the activations there are then never
read as anything but zero products) and N with zero columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from qcompiler.backends.tvm.compiled import CompiledKernel, Weights
from qcompiler.backends.tvm.int4_matmul import default_target

TILE = 64  # output columns per tile: four 16-lane int32 accumulators
LANES = 16
ROWS = 4  # rows per register tile
VNNI = "llvm.x86.avx512.vpdpbusd.512"


def quadruples(k: int) -> int:
    return -(-k // 4)


def _width(n: int) -> int:
    return -(-n // TILE) * TILE


def pack_weights(codes: np.ndarray, scale: np.ndarray, zero_u8: int) -> dict[str, np.ndarray]:
    """The kernel's layout from int8 codes ``[K, N]`` and per-column (or one) scale.

    ``zero_u8`` is the zero point of the uint8 activation codes the kernel will read (128 for
    symmetric int8 activations shifted to uint8).
    """
    codes = np.asarray(codes)
    if codes.dtype != np.int8 or codes.ndim != 2:
        raise ValueError(f"codes must be an int8 [K, N] array, got {codes.dtype} {codes.shape}")
    k, n = codes.shape
    q, width = quadruples(k), _width(n)
    full = np.zeros((4 * q, width), np.int8)
    full[:k, :n] = codes
    # [Q, 4 (i), tiles, 4 (j), 16 (l)] -> [tiles, Q, j, l, i]
    packed = full.reshape(q, 4, width // TILE, 4, LANES).transpose(2, 0, 3, 4, 1)
    zcorr = np.zeros(width, np.int32)
    zcorr[:n] = int(zero_u8) * codes.astype(np.int32).sum(axis=0)
    scale_out = np.zeros(width, np.float32)
    scale_out[:n] = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (n,))
    return {"packed": np.ascontiguousarray(packed.reshape(width // TILE, q, 4 * TILE)), "zcorr": zcorr,
            "scale": scale_out}


def kernel(m: int, k: int, n: int) -> tvm.tirx.PrimFunc:
    """The scheduled kernel for one shape: ``X`` uint8 ``[M, 4Q]``, row scales ``[M]``, ``Y`` float32 ``[M, N]``."""
    q, width = quadruples(k), _width(n)
    rows = min(m, ROWS)  # a one-row GEMV gets a one-row tile: no discarded rows
    tiles, row_tiles = width // TILE, -(-m // rows)
    ragged = n % TILE != 0

    @T.prim_func
    def int8_matmul(X: T.Buffer((m, 4 * q), "uint8"), packed: T.Buffer((tiles, q, 4 * TILE), "int8"),
                    zcorr: T.Buffer((width,), "int32"), scale: T.Buffer((width,), "float32"),
                    row_scale: T.Buffer((m,), "float32"), Y: T.Buffer((m, n), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        quads = T.decl_buffer((m, q), "int32", data=X.data)  # four uint8 codes per int32
        for task in T.parallel(tiles * row_tiles):
            acc = T.decl_buffer((rows, TILE), "int32", scope="local")
            for r in T.unroll(rows):
                for l in T.vectorized(TILE):
                    acc[r, l] = 0
            for kq in range(q):
                for r in T.unroll(rows):
                    # Rows past M repeat the last row; they are computed and never stored.
                    row = T.meta_var(T.min((task % row_tiles) * rows + r, m - 1))
                    a = T.meta_var(T.reinterpret("uint8x64", T.broadcast(quads[row, kq], LANES)))
                    for j in T.unroll(4):
                        acc[r, T.ramp(j * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                            "int32x16", VNNI, acc[r, T.ramp(j * LANES, 1, LANES)], a,
                            packed[task // row_tiles, kq, T.ramp(j * TILE, 1, TILE)])
            for r in range(rows):
                if (task % row_tiles) * rows + r < m:
                    if ragged:
                        for l in range(TILE):
                            if (task // row_tiles) * TILE + l < n:
                                Y[(task % row_tiles) * rows + r, (task // row_tiles) * TILE + l] = (
                                    row_scale[(task % row_tiles) * rows + r] * scale[(task // row_tiles) * TILE + l]
                                    * T.Cast("float32", acc[r, l] - zcorr[(task // row_tiles) * TILE + l]))
                    else:
                        for l in T.vectorized(TILE):
                            Y[(task % row_tiles) * rows + r, (task // row_tiles) * TILE + l] = (
                                row_scale[(task % row_tiles) * rows + r] * scale[(task // row_tiles) * TILE + l]
                                * T.Cast("float32", acc[r, l] - zcorr[(task // row_tiles) * TILE + l]))

    return int8_matmul


@dataclass
class Int8Matmul(CompiledKernel):
    """One compiled shape: ``matmul(x_u8, row_scale, weights)`` returns float32 ``[M, N]``.

    ``weights`` is `pack_weights`' dict; pass it through `upload` once so calls do not copy
    the weights again.
    """

    m: int
    k: int
    n: int

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        width = _width(self.n)
        return {"packed": (width // TILE, quadruples(self.k), 4 * TILE), "zcorr": (width,), "scale": (width,)}

    def __call__(self, x_u8: np.ndarray, row_scale: np.ndarray, weights: Weights) -> np.ndarray:
        padded = np.zeros((self.m, 4 * quadruples(self.k)), np.uint8)
        padded[:, :self.k] = x_u8
        return self._run(weights, [padded], [np.asarray(row_scale, np.float32)], (self.m, self.n))


def has_vnni(target: tvm.target.Target | None = None) -> bool:
    """Whether ``target`` (default: this machine's CPU) has ``vpdpbusd`` (AVX-512 VNNI)."""
    target = default_target() if target is None else target
    return target.kind.name == "llvm" and bool(tvm.target.codegen.target_has_features("avx512vnni", target))


def build(m: int, k: int, n: int, target: tvm.target.Target | str | dict | None = None) -> Int8Matmul:
    """Compile the kernel for one shape (the target must have AVX-512 VNNI)."""
    if min(m, k, n) < 1:
        raise ValueError(f"M, K and N must be positive, got {(m, k, n)}")
    target = default_target() if target is None else tvm.target.Target(target)
    if not has_vnni(target):
        raise ValueError(f"the int8 kernel needs AVX-512 VNNI, which target {target} lacks")
    return Int8Matmul(tvm.compile(tvm.IRModule({"main": kernel(m, k, n)}), target), m, k, n)
