"""A fused W4A16 matmul for CPUs, written in TIR: ``Y = X @ W`` with ``W`` kept as 4-bit codes.

``X`` is float32 ``[M, K]`` (the "A16" of W4A16: activations stay in floating point, unquantized);
``W`` is ``[K, N]`` in qcompiler's blocked uint4 form (the ONNX blocked ``DequantizeLinear``: codes
``[K, N]``, scale and zero point ``[ceil(K/g), N]``, groups of ``g`` along K, asymmetric). The
math, in two lines::

    W[k, n] = (code[k, n] - zero[k // g, n]) * scale[k // g, n]
    Y[m, n] = sum_j scale[j, n] * (sum_{k in j} X[m, k] * code[k, n] - zero[j, n] * sum_{k in j} X[m, k])

(j runs over the groups, ``k in j`` over the rows of group j.) The second line is the first
substituted into ``X @ W`` and regrouped: the inner loop only
converts a code to float and multiply-adds it, while the zero point and the scale are applied
once per group and column. ``W`` never exists in float: the small-M schedule converts codes in
registers, the large-M schedule converts one group x 64-column tile (32 KiB at g=128) into a
per-thread buffer that every row of X then reuses.

Storage layout (what `pack_weights` produces; T = 64 columns per tile, G = ceil(K / g))::

    packed  uint8    [ceil(N / T), ceil(G * g / 2), T]
    scale   float32  [ceil(N / T), G, T]
    zero    uint8    [ceil(N / T), G, T]

    packed[t, i, l] = code[2i, T*t + l] | code[2i + 1, T*t + l] << 4     (even k in the low nibble)
    scale[t, j, l]  = scale of group j, column T*t + l                   (zero likewise)

K is padded with zero codes to whole groups and N to whole tiles (zero codes, zero scales), so
the kernel never reads past a group or a tile; the padded columns are computed and dropped.
One k pair of a tile is one 64-byte cache line and four 16-lane float32 vectors, so the
codes stream sequentially along K and decode straight into AVX-512 registers. Each tile's
scales and zero points are contiguous too, as in the W4A8 kernel: a ``[G, N]`` layout put
every group's 64 scales of a tile ``4 N`` bytes from the previous group's, a separate cache
miss per group at M = 1 when the weights stream from memory.

The compiled kernel splits its work over the TVM thread pool, whose size comes from
``TVM_NUM_THREADS``; set it before the first kernel runs (this module defaults it to the
machine's CPU count, since the pool otherwise starts with a single thread on some machines).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import tvm  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from qcompiler.backends.tvm.compiled import CompiledKernel  # noqa: E402

TILE = 64  # output columns per tile: one cache line of packed codes per k pair
ROWS_GEMV = 4  # rows of X per register tile in the small-M schedule (4 x 64 floats = 16 zmm)
ROWS_GEMM = 4  # rows per register tile in the large-M schedule
ROW_BLOCK = 128  # rows of X that share one decoded weight tile in the large-M schedule
UNROLL_K = 4  # inner-loop unroll along K in the large-M schedule
GEMM_FROM_ROWS = 32  # M at which the decoded-tile schedule overtakes in-register decoding (measured)

ScheduleName = Literal["gemv", "gemm"]
Rows = int | tvm.tirx.Var  # M: a number, or a symbolic int64 variable


def _groups(k: int, group: int) -> int:
    return -(-k // group)


def _padded(n: int) -> int:
    return -(-n // TILE) * TILE


def pack_weights(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> dict[str, np.ndarray]:
    """The kernel's layout from qcompiler's: codes ``[K, N]`` (0..15), scale/zero ``[ceil(K/g), N]``.

    Returns ``{"packed", "scale", "zero"}`` as described in the module docstring.
    """
    codes, scale, zero = np.asarray(codes), np.asarray(scale), np.asarray(zero)
    k, n = codes.shape
    g = _groups(k, group)
    if scale.shape != (g, n) or zero.shape != (g, n):
        raise ValueError(f"scale and zero must be [{g}, {n}] for codes [{k}, {n}] in groups of {group}, "
                         f"got {scale.shape} and {zero.shape}")
    if codes.min(initial=0) < 0 or codes.max(initial=0) > 15 or zero.min(initial=0) < 0 or zero.max(initial=0) > 15:
        raise ValueError("codes and zero points must be uint4 values in 0..15")
    pairs, width = -(-g * group // 2), _padded(n)
    full = np.zeros((2 * pairs, width), np.uint8)
    full[:k, :n] = codes
    packed = full[0::2] | (full[1::2] << 4)  # [pairs, width], even k in the low nibble
    packed = np.ascontiguousarray(packed.reshape(pairs, width // TILE, TILE).transpose(1, 0, 2))
    per_tile = {}
    for name, value, dtype in (("scale", scale, np.float32), ("zero", zero, np.uint8)):
        padded = np.zeros((g, width), dtype)
        padded[:, :n] = value
        per_tile[name] = np.ascontiguousarray(padded.reshape(g, width // TILE, TILE).transpose(1, 0, 2))
    return {"packed": packed, **per_tile}


def kernel(m: Rows, k: int, n: int, group: int) -> tvm.tirx.PrimFunc:
    """The unscheduled computation; the schedules cut the staging buffers down to tiles.

    ``m`` is a number, or a symbolic int64 variable for a kernel that serves any M.
    """
    g = _groups(k, group)
    pairs, tiles, width = -(-g * group // 2), _padded(n) // TILE, _padded(n)
    # A symbolic M is int64 (Relax's shape type): the other extents follow, or the schedules' index
    # expressions mix widths, and a cast index is not affine.
    index = (lambda v: v) if isinstance(m, int) else T.int64
    g_, group_, k_, n_, width_ = (index(v) for v in (g, group, k, n, width))
    pairs_, tiles_, tile_ = index(pairs), index(tiles), index(TILE)

    @T.prim_func(s_tir=True)
    def int4_matmul(X: T.Buffer((m, k_), "float32"), packed: T.Buffer((tiles_, pairs_, tile_), "uint8"),
                    scale: T.Buffer((tiles_, g_, tile_), "float32"), zero: T.Buffer((tiles_, g_, tile_), "uint8"),
                    Y: T.Buffer((m, n_), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        with T.sblock("root"):
            xsum = T.sblock_alloc_buffer((m, g_), "float32")  # sum of X over each group
            code = T.sblock_alloc_buffer((g_ * group_, width_), "float32")  # codes as floats
            dot = T.sblock_alloc_buffer((m, g_, width_), "float32")  # X . code within each group
            acc = T.sblock_alloc_buffer((m, width_), "float32")
            # X past K reads as 0 (the guard folds away when K is a multiple of the group).
            for i, j, kk in T.grid(m, g_, group_):
                with T.sblock("xsum"):
                    vi, vj, vkk = T.axis.remap("SSR", [i, j, kk])
                    with T.init():
                        xsum[vi, vj] = T.float32(0)
                    xsum[vi, vj] = xsum[vi, vj] + T.if_then_else(
                        vj * group + vkk < k, X[vi, vj * group + vkk], T.float32(0))
            for kk, c in T.grid(g_ * group_, width_):
                with T.sblock("decode"):
                    vk, vc = T.axis.remap("SS", [kk, c])
                    # (TVMScript has no local names inside a block: the byte is read inline.)
                    code[vk, vc] = T.Cast("float32", T.bitwise_and(
                        T.shift_right(packed[vc // TILE, vk // 2, vc % TILE], T.Cast("uint8", vk % 2 * 4)),
                        T.uint8(15)))
            for i, j, c, kk in T.grid(m, g_, width_, group_):
                with T.sblock("dot"):
                    vi, vj, vc, vkk = T.axis.remap("SSSR", [i, j, c, kk])
                    with T.init():
                        dot[vi, vj, vc] = T.float32(0)
                    dot[vi, vj, vc] = dot[vi, vj, vc] + T.if_then_else(
                        vj * group + vkk < k, X[vi, vj * group + vkk], T.float32(0)) * code[vj * group + vkk, vc]
            for i, c, j in T.grid(m, width_, g_):
                with T.sblock("matmul"):
                    vi, vc, vj = T.axis.remap("SSR", [i, c, j])
                    with T.init():
                        acc[vi, vc] = T.float32(0)
                    acc[vi, vc] = acc[vi, vc] + scale[vc // TILE, vj, vc % TILE] * (
                        dot[vi, vj, vc] - T.Cast("float32", zero[vc // TILE, vj, vc % TILE]) * xsum[vi, vj])
            for i, c in T.grid(m, n_):
                with T.sblock("store"):
                    vi, vc = T.axis.remap("SS", [i, c])
                    Y[vi, vc] = acc[vi, vc]

    return int4_matmul


def schedule_gemv(m: Rows, k: int, n: int, group: int, rows: int | None = None) -> tvm.IRModule:
    """Few rows (weight traffic and decoding dominate): decode codes in registers, where they are used.

    Threads split the 64-column tiles (and row blocks); per tile, a register tile of up to
    4 rows x 64 columns accumulates one group at a time, then the group's zero point and scale
    are applied (``rows`` of them: by default ``min(M, 4)``, 4 for a symbolic M). The k loop is
    unrolled by two so each byte's two nibbles use constant shifts.
    """
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": kernel(m, k, n, group)}))
    matmul, dot = sch.get_sblock("matmul"), sch.get_sblock("dot")
    sch.set_scope(matmul, 0, "local")
    sch.set_scope(dot, 0, "local")
    sch.compute_inline(sch.get_sblock("decode"))
    row_loop, cols, grp = sch.get_loops(matmul)
    col_tile, col = sch.split(cols, [None, TILE])
    row_tile, row = sch.split(row_loop, [None, _tile_rows(m, rows)])
    # A symbolic row count goes outside: a fused index split by a symbolic extent is not affine.
    outer = (col_tile, row_tile) if isinstance(m, int) else (row_tile, col_tile)
    sch.reorder(*outer, grp, row, col)
    sch.compute_at(dot, grp, preserve_unit_loops=True)
    task = sch.fuse(*outer)
    sch.parallel(task)
    sch.vectorize(col)
    sch.unroll(row)
    d_row, _, d_col, d_k = sch.get_loops(dot)[-4:]
    d_pair, d_nibble = sch.split(d_k, [None, 2])
    sch.reorder(d_pair, d_nibble, d_row, d_col)
    sch.vectorize(d_col)
    sch.unroll(d_row)
    sch.unroll(d_nibble)
    sch.decompose_reduction(dot, d_pair)
    sch.decompose_reduction(matmul, grp)
    _store(sch, task, n)
    return sch.mod


def schedule_gemm(m: Rows, k: int, n: int, group: int) -> tvm.IRModule:
    """Large M (compute bound): decode each group x 64-column tile once, reuse it for 128 rows.

    Threads split (column tile, row block) pairs. Per group, the tile's codes become a float
    buffer that stays in L1/L2; a 4 x 64 register tile (16 AVX-512 accumulators) then runs a
    plain FMA loop over it for every 4 rows, so each weight is decoded once per 128 rows.
    """
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": kernel(m, k, n, group)}))
    matmul, dot, decode = sch.get_sblock("matmul"), sch.get_sblock("dot"), sch.get_sblock("decode")
    for block in (matmul, dot, decode):
        sch.set_scope(block, 0, "local")
    rows, cols, grp = sch.get_loops(matmul)
    col_tile, col = sch.split(cols, [None, TILE])
    per_block = -(-(min(m, ROW_BLOCK) if isinstance(m, int) else ROW_BLOCK) // ROWS_GEMM)
    row_block, row_tile, row = sch.split(rows, [None, per_block, ROWS_GEMM])
    outer = (col_tile, row_block) if isinstance(m, int) else (row_block, col_tile)  # as in `schedule_gemv`
    sch.reorder(*outer, grp, row_tile, row, col)
    sch.compute_at(dot, row_tile, preserve_unit_loops=True)
    sch.compute_at(decode, grp, preserve_unit_loops=True)
    task = sch.fuse(*outer)
    sch.parallel(task)
    sch.vectorize(col)
    sch.unroll(row)
    d_row, _, d_col, d_k = sch.get_loops(dot)[-4:]
    d_outer, d_inner = sch.split(d_k, [None, UNROLL_K])
    sch.reorder(d_outer, d_inner, d_row, d_col)
    sch.vectorize(d_col)
    sch.unroll(d_row)
    sch.unroll(d_inner)
    sch.decompose_reduction(dot, d_outer)
    c_k, c_col = sch.get_loops(decode)[-2:]
    _, c_nibble = sch.split(c_k, [None, 2])
    sch.vectorize(c_col)
    sch.unroll(c_nibble)
    sch.decompose_reduction(matmul, grp)
    _store(sch, task, n)
    return sch.mod


def _store(sch: tvm.s_tir.Schedule, task: tvm.s_tir.schedule.LoopRV, n: int) -> None:
    """Write each task's accumulators to Y, vectorized unless the last tile is ragged."""
    store = sch.get_sblock("store")
    sch.reverse_compute_at(store, task)
    if n % TILE == 0:
        sch.vectorize(sch.get_loops(store)[-1])


def default_target() -> tvm.target.Target:
    """This machine's CPU: a plain ``"llvm"`` target compiles for baseline x86-64 (SSE2, no AVX)."""
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                              "num-cores": os.cpu_count() or 1})


@dataclass
class Int4Matmul(CompiledKernel):
    """One compiled shape. ``matmul(x, weights)`` returns ``x @ W`` as a float32 numpy array.

    ``weights`` is `pack_weights`' dict; pass it through `upload` once so calls do not copy
    the weights again.
    """

    group: int
    schedule: ScheduleName

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        g, width = _groups(self.k, self.group), _padded(self.n)
        tiles = width // TILE
        return {"packed": (tiles, -(-g * self.group // 2), TILE), "scale": (tiles, g, TILE), "zero": (tiles, g, TILE)}


def scheduled(m: Rows, k: int, n: int, group: int, schedule: ScheduleName | None = None,
              rows: int | None = None) -> tvm.tirx.PrimFunc:
    """The scheduled kernel (``schedule`` defaults by M: gemv below 32 rows, else gemm; a symbolic M needs one).

    ``rows`` is the gemv schedule's register tile height (see `schedule_gemv`).
    """
    if min(m if isinstance(m, int) else 1, k, n, group) < 1:
        raise ValueError(f"M, K, N and the group size must be positive, got {(m, k, n, group)}")
    if schedule is None and not isinstance(m, int):
        raise ValueError("a kernel for a symbolic M needs its schedule named")
    schedule = schedule or ("gemv" if m < GEMM_FROM_ROWS else "gemm")
    if schedule == "gemv":
        return schedule_gemv(m, k, n, group, rows)["main"]
    return schedule_gemm(m, k, n, group)["main"]


def _tile_rows(m: Rows, rows: int | None) -> int:
    return rows or (min(m, ROWS_GEMV) if isinstance(m, int) else ROWS_GEMV)


def build(m: int, k: int, n: int, group: int, target: tvm.target.Target | str | dict | None = None,
          schedule: ScheduleName | None = None) -> Int4Matmul:
    """Compile the kernel for one shape."""
    schedule = schedule or ("gemv" if m < GEMM_FROM_ROWS else "gemm")
    target = default_target() if target is None else tvm.target.Target(target)
    func = scheduled(m, k, n, group, schedule)
    return Int4Matmul(tvm.compile(tvm.IRModule({"main": func}), target), m, k, n, group, schedule)
