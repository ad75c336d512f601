"""W4A8 in integer arithmetic: int8 activations x 4-bit grouped weights -> int32 per group, on AVX-512 VNNI.

The W4A16 kernel (`int4_matmul`) decodes every 4-bit code to float and multiply-adds in float;
with int8 activations (W4A8's per-token codes) the same product is exact in integers, and
``vpdpbusd`` does 64 of them per instruction. Per group ``g`` of ``G`` rows of K, with the
activations as uint8 ``xu8 = x + 128`` and the codes ``c`` (0..15, zero point ``z``)::

    acc[m, n]  = sum_{k in g} xu8[m, k] c[k, n]                                   (vpdpbusd, exact)
    Y[m, n]    = s_row[m] sum_g scale[g, n] (acc - z[g, n] rowsum[m, g] - corr[g, n])

with ``rowsum[m, g] = sum_{k in g} xu8[m, k]`` (computed once per row, outside) and
``corr[g, n] = 128 sum_{k in g} (c[k, n] - z[g, n])`` (precomputed at pack time), which
together turn ``sum xu8 c`` into ``sum (xu8 - 128)(c - z)``, the true integer product.

Layout (`pack_weights`; T = 32 columns per tile, Q = K' / 4 quadruples, K' = K padded to
whole groups, padding codes equal to the zero point so they add nothing)::

    packed  uint8  [N' / T, Q, 64]   byte 4 l + i = c[4 q + i, T t + l] | c[4 q + i, T t + 16 + l] << 4
    scale   float32 [groups, N'],  zero int32 [groups, N'],  corr int32 [groups, N']

One 64-byte load gives, after a mask and a shift, both 16-column operands of a quadruple;
a register tile of up to 4 rows x 32 columns keeps 8 int32 and 8 float32 accumulators.
The group size must be a multiple of 4 (one quadruple never straddles two groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from qcompiler.backends.tvm.compiled import CompiledKernel, Weights
from qcompiler.backends.tvm.int4_matmul import default_target
from qcompiler.backends.tvm.int8_matmul import VNNI, has_vnni

TILE = 32  # output columns per tile: two 16-lane int32 accumulators per row
LANES = 16
ROWS = 4
ZERO_U8 = 128  # activation codes arrive as x + 128


def _width(n: int) -> int:
    return -(-n // TILE) * TILE


def supports(group: int) -> bool:
    return group % 4 == 0


def pack_weights(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> dict[str, np.ndarray]:
    """The kernel's layout from uint4 codes ``[K, N]`` (0..15) and per-group ``scale``, ``zero`` ``[groups, N]``."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype != np.uint8 or codes.size and codes.max() > 15:
        raise ValueError(f"codes must be uint8 [K, N] in 0..15, got {codes.dtype} {codes.shape}")
    if not supports(group):
        raise ValueError(f"the W4A8 kernel needs a group size that is a multiple of 4, not {group}")
    k, n = codes.shape
    groups, width = -(-k // group), _width(n)
    zero = np.broadcast_to(np.asarray(zero, np.int32).reshape(-1, n), (groups, n))
    full = np.zeros((groups * group, width), np.uint8)
    full[:, :n] = np.repeat(zero, group, axis=0).astype(np.uint8)  # padding rows: code = zero point
    full[:k, :n] = codes
    # [Q, 4 (i), tiles, 2 (half), 16 (l)] -> [tiles, Q, l, i] per half; halves become the two nibbles.
    quads = full.reshape(groups * group // 4, 4, width // TILE, 2, LANES).transpose(2, 0, 3, 4, 1)
    packed = quads[:, :, 0].reshape(width // TILE, -1, 64) | (quads[:, :, 1].reshape(width // TILE, -1, 64) << 4)
    corr = np.zeros((groups, width), np.int32)
    corr[:, :n] = ZERO_U8 * (full[:, :n].astype(np.int32).reshape(groups, group, n) - zero[:, None, :]).sum(axis=1)
    padded = {name: np.zeros((groups, width), dtype) for name, dtype in (("scale", np.float32), ("zero", np.int32))}
    padded["scale"][:, :n] = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1, n), (groups, n))
    padded["zero"][:, :n] = zero
    return {"packed": np.ascontiguousarray(packed), "scale": padded["scale"], "zero": padded["zero"], "corr": corr}


def kernel(m: int, k: int, n: int, group: int) -> tvm.tirx.PrimFunc:
    """The scheduled kernel: ``X`` uint8 ``[M, K']``, ``rowsum`` int32 ``[M, groups]``, row scales ``[M]``."""
    groups, width = -(-k // group), _width(n)
    q, per_group = groups * group // 4, group // 4
    rows = min(m, ROWS)
    tiles, row_tiles = width // TILE, -(-m // rows)

    @T.prim_func
    def w4a8_matmul(X: T.Buffer((m, 4 * q), "uint8"), packed: T.Buffer((tiles, q, 64), "uint8"),
                    scale: T.Buffer((groups, width), "float32"), zero: T.Buffer((groups, width), "int32"),
                    corr: T.Buffer((groups, width), "int32"), rowsum: T.Buffer((m, groups), "int32"),
                    row_scale: T.Buffer((m,), "float32"), Y: T.Buffer((m, n), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        quads = T.decl_buffer((m, q), "int32", data=X.data)  # four uint8 codes per int32
        for task in T.parallel(tiles * row_tiles):
            total = T.decl_buffer((rows, TILE), "float32", scope="local")
            acc = T.decl_buffer((rows, TILE), "int32", scope="local")
            for r in T.unroll(rows):
                for l in T.vectorized(TILE):
                    total[r, l] = T.float32(0)
            for g in range(groups):
                for r in T.unroll(rows):
                    for l in T.vectorized(TILE):
                        acc[r, l] = 0
                for kq in range(per_group):
                    nibbles = T.meta_var(packed[task // row_tiles, g * per_group + kq, T.ramp(0, 1, 64)])
                    low = T.meta_var(T.reinterpret("int8x64", T.bitwise_and(nibbles, T.broadcast(T.uint8(15), 64))))
                    high = T.meta_var(T.reinterpret("int8x64", T.shift_right(nibbles, T.broadcast(T.uint8(4), 64))))
                    for r in T.unroll(rows):
                        # Rows past M repeat the last row; they are computed and never stored.
                        row = T.meta_var(T.min((task % row_tiles) * rows + r, m - 1))
                        a = T.meta_var(T.reinterpret("uint8x64", T.broadcast(quads[row, g * per_group + kq], LANES)))
                        acc[r, T.ramp(0, 1, LANES)] = T.call_llvm_pure_intrin(
                            "int32x16", VNNI, acc[r, T.ramp(0, 1, LANES)], a, low)
                        acc[r, T.ramp(LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                            "int32x16", VNNI, acc[r, T.ramp(LANES, 1, LANES)], a, high)
                for r in T.unroll(rows):
                    for l in T.vectorized(TILE):
                        column = T.meta_var((task // row_tiles) * TILE + l)
                        row = T.meta_var(T.min((task % row_tiles) * rows + r, m - 1))
                        total[r, l] = total[r, l] + scale[g, column] * T.Cast(
                            "float32", acc[r, l] - zero[g, column] * rowsum[row, g] - corr[g, column])
            for r in range(rows):
                for l in range(TILE):
                    if (task % row_tiles) * rows + r < m and (task // row_tiles) * TILE + l < n:
                        Y[(task % row_tiles) * rows + r, (task // row_tiles) * TILE + l] = (
                            row_scale[(task % row_tiles) * rows + r] * total[r, l])

    return w4a8_matmul


@dataclass
class W4A8Matmul(CompiledKernel):
    """One compiled shape: ``matmul(x_u8, row_scale, weights)`` returns float32 ``[M, N]``."""

    m: int
    k: int
    n: int
    group: int

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        groups, width = -(-self.k // self.group), _width(self.n)
        per_group = (groups, width)
        return {"packed": (width // TILE, groups * self.group // 4, 64), "scale": per_group, "zero": per_group,
                "corr": per_group}

    def __call__(self, x_u8: np.ndarray, row_scale: np.ndarray, weights: Weights) -> np.ndarray:
        groups = -(-self.k // self.group)
        padded = np.full((self.m, groups * self.group), ZERO_U8, np.uint8)
        padded[:, :self.k] = x_u8
        rowsum = padded.astype(np.int32).reshape(self.m, groups, self.group).sum(axis=2, dtype=np.int32)
        return self._run(weights, [padded], [rowsum, np.asarray(row_scale, np.float32)], (self.m, self.n))


def build(m: int, k: int, n: int, group: int, target: tvm.target.Target | str | dict | None = None) -> W4A8Matmul:
    """Compile the kernel for one shape (the target must have AVX-512 VNNI)."""
    if min(m, k, n, group) < 1:
        raise ValueError(f"M, K, N and the group size must be positive, got {(m, k, n, group)}")
    target = default_target() if target is None else tvm.target.Target(target)
    if not has_vnni(target):
        raise ValueError(f"the W4A8 kernel needs AVX-512 VNNI, which target {target} lacks")
    return W4A8Matmul(tvm.compile(tvm.IRModule({"main": kernel(m, k, n, group)}), target), m, k, n, group)
