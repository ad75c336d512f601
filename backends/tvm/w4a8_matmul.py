"""W4A8 in integers: float X quantized to int8 per token x 4-bit grouped weights -> int32 per group, on AVX-512 VNNI.

The W4A16 kernel (`int4_matmul`) decodes every 4-bit code to float and multiply-adds in float;
with int8 activations (W4A8's per-token codes) the same product is exact in integers, and
``vpdpbusd`` does 64 of them per instruction. The kernel takes float32 ``X`` and quantizes it
itself (symmetric int8 per row, ``s_row = max|x| / 127``, round half to even: the int8
kernel's prologue), as onnxruntime's ``MatMulNBits`` takes float X. ``vpdpbusd`` multiplies
unsigned by signed bytes: the codes ``c`` (0..15, zero point ``z``) are the unsigned operand
and the int8 activations ``x`` the signed one, so per group ``g`` of ``G`` rows of K::

    acc[m, n]  = sum_{k in g} c[k, n] x[m, k]                                      (vpdpbusd, exact)
    Y[m, n]    = s_row[m] sum_g scale[g, n] (acc - z[g, n] xsum[m, g])

with ``xsum[m, g] = sum_{k in g} x[m, k]`` (computed once per row with the codes), which
turns ``sum c x`` into ``sum (c - z) x``, the true integer product.

Layout (`pack_weights`; T = 32 columns per tile, Q = K' / 4 quadruples, K' = K padded to
whole groups; padding rows meet activation codes 0, so they add nothing)::

    packed  uint8   [N' / T, Q, 64]   byte 4 l + i = c[4 q + i, T t + l] | c[4 q + i, T t + 16 + l] << 4
    scale   float32 [N' / T, groups, T],  zero uint8 [N' / T, groups, T]   ([t, g, l]: column T t + l)

Each tile's scales and zero points are contiguous, as its codes are: at M = 1 the weights
stream from memory once per call, and a [groups, N'] layout made every group's scales a
separate cache miss 16 KiB from the last, which the prefetchers do not follow.

One 64-byte load gives, after a mask and a shift, both 16-column operands of a quadruple;
a register tile of up to 4 rows x 32 columns keeps 8 int32 and 8 float32 accumulators.
The group size must be a multiple of 4 (one quadruple never straddles two groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from qcompiler.backends.tvm.compiled import CompiledKernel
from qcompiler.backends.tvm.int4_matmul import default_target
from qcompiler.backends.tvm.int8_matmul import LANES, SERIAL_ROWS, VNNI, encode, has_vnni, row_step

TILE = 32  # output columns per tile: two 16-lane int32 accumulators per row
ROWS = 4


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
    zero = np.broadcast_to(np.asarray(zero, np.uint8).reshape(-1, n), (groups, n))
    full = np.zeros((groups * group, width), np.uint8)
    full[:k, :n] = codes
    # [Q, 4 (i), tiles, 2 (half), 16 (l)] -> [tiles, Q, l, i] per half; halves become the two nibbles.
    quads = full.reshape(groups * group // 4, 4, width // TILE, 2, LANES).transpose(2, 0, 3, 4, 1)
    packed = quads[:, :, 0].reshape(width // TILE, -1, 64) | (quads[:, :, 1].reshape(width // TILE, -1, 64) << 4)
    padded = {name: np.zeros((groups, width), dtype) for name, dtype in (("scale", np.float32), ("zero", np.uint8))}
    padded["scale"][:, :n] = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1, n), (groups, n))
    padded["zero"][:, :n] = zero
    per_tile = {name: np.ascontiguousarray(value.reshape(groups, width // TILE, TILE).transpose(1, 0, 2))
                for name, value in padded.items()}
    return {"packed": np.ascontiguousarray(packed), **per_tile}


def kernel(m: Rows, k: int, n: int, group: int, rows: int | None = None) -> tvm.tirx.PrimFunc:
    """The scheduled kernel: ``X`` float32 ``[M, K]`` in, ``Y`` float32 ``[M, N]`` out.

    ``m`` and ``rows`` as in the int8 kernel: a number or a symbolic variable, and the register
    tile's height (default ``min(M, 4)``; 4 for a symbolic M).
    """
    groups, width = -(-k // group), _width(n)
    q, per_group = groups * group // 4, group // 4
    rows = rows or (min(m, ROWS) if isinstance(m, int) else ROWS)
    tiles, row_tiles = width // TILE, (m + rows - 1) // rows

    @T.macro
    def quantize(X, r, codes, xsum, step):
        """Row ``r``'s int8 codes (zero past K), their sum per group and their scale."""
        lanes = T.decl_buffer((LANES,), "float32", scope="local")
        row_step(X, r, k, lanes, step)
        encode(X, r, k, 4 * q, step[r], T.float32(0), 0, codes)
        total = T.decl_buffer((1,), "int32", scope="local")
        for g in range(groups):
            total[0] = 0
            for c in range(group):
                total[0] = total[0] + T.Cast("int32", codes[r, g * group + c])
            xsum[r, g] = total[0]

    @T.prim_func
    def w4a8_matmul(X: T.Buffer((m, k), "float32"), packed: T.Buffer((tiles, q, 64), "uint8"),
                    scale: T.Buffer((tiles, groups, TILE), "float32"), zero: T.Buffer((tiles, groups, TILE), "uint8"),
                    Y: T.Buffer((m, n), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        codes = T.decl_buffer((m, 4 * q), "int8")
        xsum = T.decl_buffer((m, groups), "int32")
        row_scale = T.decl_buffer((m,), "float32")
        if m < SERIAL_ROWS:
            for r in range(m):
                quantize(X, r, codes, xsum, row_scale)
        else:
            for r in T.parallel(m):
                quantize(X, r, codes, xsum, row_scale)
        quads = T.decl_buffer((m, q), "int32", data=codes.data)  # four int8 codes per int32
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
                    low = T.meta_var(T.bitwise_and(nibbles, T.broadcast(T.uint8(15), 64)))
                    high = T.meta_var(T.shift_right(nibbles, T.broadcast(T.uint8(4), 64)))
                    for r in T.unroll(rows):
                        # Rows past M repeat the last row; they are computed and never stored.
                        row = T.meta_var(T.min((task % row_tiles) * rows + r, m - 1))
                        x = T.meta_var(T.reinterpret("int8x64", T.broadcast(quads[row, g * per_group + kq], LANES)))
                        acc[r, T.ramp(0, 1, LANES)] = T.call_llvm_pure_intrin(
                            "int32x16", VNNI, acc[r, T.ramp(0, 1, LANES)], low, x)
                        acc[r, T.ramp(LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                            "int32x16", VNNI, acc[r, T.ramp(LANES, 1, LANES)], high, x)
                for r in T.unroll(rows):
                    for l in T.vectorized(TILE):
                        row = T.meta_var(T.min((task % row_tiles) * rows + r, m - 1))
                        total[r, l] = total[r, l] + scale[task // row_tiles, g, l] * T.Cast(
                            "float32", acc[r, l] - T.Cast("int32", zero[task // row_tiles, g, l]) * xsum[row, g])
            for r in range(rows):
                for l in range(TILE):
                    if (task % row_tiles) * rows + r < m and (task // row_tiles) * TILE + l < n:
                        Y[(task % row_tiles) * rows + r, (task // row_tiles) * TILE + l] = (
                            row_scale[(task % row_tiles) * rows + r] * total[r, l])

    return w4a8_matmul


@dataclass
class W4A8Matmul(CompiledKernel):
    """One compiled shape: ``matmul(x, weights)`` quantizes float32 ``x`` per row and returns float32 ``[M, N]``."""

    group: int

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        groups, width = -(-self.k // self.group), _width(self.n)
        return {"packed": (width // TILE, groups * self.group // 4, 64), "scale": (width // TILE, groups, TILE),
                "zero": (width // TILE, groups, TILE)}


def build(m: int, k: int, n: int, group: int, target: tvm.target.Target | str | dict | None = None) -> W4A8Matmul:
    """Compile the kernel for one shape (the target must have AVX-512 VNNI)."""
    if min(m, k, n, group) < 1:
        raise ValueError(f"M, K, N and the group size must be positive, got {(m, k, n, group)}")
    target = default_target() if target is None else tvm.target.Target(target)
    if not has_vnni(target):
        raise ValueError(f"the W4A8 kernel needs AVX-512 VNNI, which target {target} lacks")
    return W4A8Matmul(tvm.compile(tvm.IRModule({"main": kernel(m, k, n, group)}), target), m, k, n, group)
