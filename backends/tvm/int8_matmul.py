"""An int8 x int8 -> int32 matmul with a float epilogue for CPUs with AVX-512 VNNI, written in TIR.

``Y = X @ W`` for W8A8 linears: ``X`` is float32 ``[M, K]``, ``W`` is int8 codes ``[K, N]``
with one scale per output column. The kernel quantizes ``X`` itself, as onnxruntime's
integer ops take float activations: per token (symmetric int8, ``s_row = max|x| / 127``) or
static per tensor (a scale and zero point ``z``, the kernel input ``activation``, so layers of
one shape share a kernel), stored as uint8 codes
``xu8 = q + 128``. The math, in two lines::

    acc[m, n] = sum_k xu8[m, k] * W[k, n]                           (exact, int32)
    Y[m, n]   = s_row[m] * s_col[n] * (acc[m, n] - zu8 * colsum[n])  (zu8 = z + 128)

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

The quantization macros here (`row_step`, `encode`) are also the W4A8 kernel's prologue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from qcompiler.backends.tvm.compiled import CompiledKernel
from qcompiler.backends.tvm.int4_matmul import default_target

TILE = 64  # output columns per tile: four 16-lane int32 accumulators
LANES = 16
ROWS = 4  # rows per register tile
SERIAL_ROWS = 4  # fewer rows are quantized on the calling thread: a pool launch costs more than they do
VNNI = "llvm.x86.avx512.vpdpbusd.512"

Static = tuple[float, int]  # a static activation quantizer: scale and int8 zero point
Rows = int | tvm.tirx.Var  # M: a number, or a symbolic int64 variable


def quadruples(k: int) -> int:
    return -(-k // 4)


def _width(n: int) -> int:
    return -(-n // TILE) * TILE


def _code(value, step, zero, shift: int, dtype: str):
    """``clip(round(value / step) + zero, -128, 127) + shift``, rounding half to even as numpy and onnxruntime do."""
    code = T.nearbyint(value / step) + zero
    return T.Cast(dtype, T.max(T.min(code, T.float32(127)), T.float32(-128)) + T.float32(shift))


@T.macro
def row_step(X, r, k, lanes, step):
    """``step[r] = max(max |X[r, :k]| / 127, 1e-30)``: qcompiler's symmetric int8 per-token scale.

    ``lanes`` is a local float32 buffer of `LANES`: the maximum runs in vector lanes.
    """
    for l in T.vectorized(LANES):
        lanes[l] = T.float32(0)
    for c in range(k // LANES):
        for l in T.vectorized(LANES):
            lanes[l] = T.max(lanes[l], T.abs(X[r, c * LANES + l]))
    for c in range(k % LANES):
        lanes[0] = T.max(lanes[0], T.abs(X[r, k // LANES * LANES + c]))
    for l in range(1, LANES):
        lanes[0] = T.max(lanes[0], lanes[l])
    step[r] = T.max(lanes[0] / T.float32(127), T.float32(1e-30))


@T.macro
def encode(X, r, k, width, step, zero, shift, codes):
    """Row ``r`` of ``codes`` (``width`` >= ``k`` wide) from ``X`` by `_code`; columns past ``k`` hold the code of 0."""
    for c in range(k // LANES):
        for l in T.vectorized(LANES):
            codes[r, c * LANES + l] = _code(X[r, c * LANES + l], step, zero, shift, codes.dtype)
    for c in range(k % LANES):
        codes[r, k // LANES * LANES + c] = _code(X[r, k // LANES * LANES + c], step, zero, shift, codes.dtype)
    for c in range(width - k):
        codes[r, k + c] = T.Cast(codes.dtype, zero + T.float32(shift))


def pack_weights(codes: np.ndarray, scale: np.ndarray, static: Static | None = None) -> dict[str, np.ndarray]:
    """The kernel's layout from int8 codes ``[K, N]`` and per-column (or one) scale.

    ``static`` is the activations' (scale, zero point) when they are quantized statically; it
    becomes the kernel input ``activation`` (float32 ``[2]``), and its zero point the
    correction's ``zu8``. None means per-token activations (``zu8 = 128``).
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
    zcorr[:n] = (128 + (0 if static is None else int(static[1]))) * codes.astype(np.int32).sum(axis=0)
    scale_out = np.zeros(width, np.float32)
    scale_out[:n] = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (n,))
    result = {"packed": np.ascontiguousarray(packed.reshape(width // TILE, q, 4 * TILE)), "zcorr": zcorr,
              "scale": scale_out}
    if static is not None:
        result["activation"] = np.array(static, np.float32)
    return result


def kernel(m: Rows, k: int, n: int, static: bool = False, rows: int | None = None) -> tvm.tirx.PrimFunc:
    """The scheduled kernel: ``X`` float32 ``[M, K]`` in, ``Y`` float32 ``[M, N]`` out.

    With ``static`` the activation quantizer is an input (``activation``: scale, zero point,
    after the weights), so layers of one shape share the kernel; otherwise X is quantized per token.
    ``m`` is a number, or a symbolic ``int64`` variable for a kernel that serves any M.
    ``rows`` is the register tile's height: by default ``min(M, 4)``, so a one-row GEMV gets
    a one-row tile and computes no discarded rows (a symbolic M gets 4).
    """
    q, width = quadruples(k), _width(n)
    rows = rows or (min(m, ROWS) if isinstance(m, int) else ROWS)
    tiles, row_tiles = width // TILE, (m + rows - 1) // rows
    ragged = n % TILE != 0

    @T.macro
    def quantize(X, r, activation, codes, step):
        if activation is None:
            lanes = T.decl_buffer((LANES,), "float32", scope="local")
            row_step(X, r, k, lanes, step)
            encode(X, r, k, 4 * q, step[r], T.float32(0), 128, codes)
        else:
            step[r] = activation[0]
            encode(X, r, k, 4 * q, activation[0], activation[1], 128, codes)

    @T.macro
    def matmul(X, packed, zcorr, scale, activation, Y):
        codes = T.decl_buffer((m, 4 * q), "uint8")
        row_scale = T.decl_buffer((m,), "float32")
        if m < SERIAL_ROWS:
            for r in range(m):
                quantize(X, r, activation, codes, row_scale)
        else:
            for r in T.parallel(m):
                quantize(X, r, activation, codes, row_scale)
        quads = T.decl_buffer((m, q), "int32", data=codes.data)  # four uint8 codes per int32
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

    if static:
        @T.prim_func
        def int8_matmul_static(X: T.Buffer((m, k), "float32"), packed: T.Buffer((tiles, q, 4 * TILE), "int8"),
                               zcorr: T.Buffer((width,), "int32"), scale: T.Buffer((width,), "float32"),
                               activation: T.Buffer((2,), "float32"), Y: T.Buffer((m, n), "float32")):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            matmul(X, packed, zcorr, scale, activation, Y)

        return int8_matmul_static

    @T.prim_func
    def int8_matmul(X: T.Buffer((m, k), "float32"), packed: T.Buffer((tiles, q, 4 * TILE), "int8"),
                    zcorr: T.Buffer((width,), "int32"), scale: T.Buffer((width,), "float32"),
                    Y: T.Buffer((m, n), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        matmul(X, packed, zcorr, scale, None, Y)

    return int8_matmul


@dataclass
class Int8Matmul(CompiledKernel):
    """One compiled shape: ``matmul(x, weights)`` quantizes float32 ``x`` and returns float32 ``[M, N]``.

    ``weights`` is `pack_weights`' dict; pass it through `upload` once so calls do not copy
    the weights again.
    """

    static: bool = False

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        width = _width(self.n)
        shapes = {"packed": (width // TILE, quadruples(self.k), 4 * TILE), "zcorr": (width,), "scale": (width,)}
        return {**shapes, "activation": (2,)} if self.static else shapes


def has_vnni(target: tvm.target.Target | None = None) -> bool:
    """Whether ``target`` (default: this machine's CPU) has ``vpdpbusd`` (AVX-512 VNNI)."""
    target = default_target() if target is None else target
    return target.kind.name == "llvm" and bool(tvm.target.codegen.target_has_features("avx512vnni", target))


def build(m: int, k: int, n: int, static: bool = False,
          target: tvm.target.Target | str | dict | None = None) -> Int8Matmul:
    """Compile the kernel for one shape, per-token or ``static`` (the target must have AVX-512 VNNI)."""
    if min(m, k, n) < 1:
        raise ValueError(f"M, K and N must be positive, got {(m, k, n)}")
    target = default_target() if target is None else tvm.target.Target(target)
    if not has_vnni(target):
        raise ValueError(f"the int8 kernel needs AVX-512 VNNI, which target {target} lacks")
    return Int8Matmul(tvm.compile(tvm.IRModule({"main": kernel(m, k, n, static)}), target), m, k, n, static)
