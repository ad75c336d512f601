"""CPU schedules for the float ops around the kernels: the rest of the model, made parallel and vectorized.

TVM's default CPU pipeline legalizes every Relax op to TIR and compiles it as written: one
scalar thread per op. On MiniLM that left the attention matmuls, softmax and GELU taking most
of the time while the quantized linears ran on our kernels. This module supplies the
schedules, as dlight rules, applied to every fused function the kernels do not cover:

- `Matmul` (batched ``C[b, i, j] = sum_k A[b, i, k] B[b, k, j]`` plus elementwise epilogue, as
  attention's ``Q K^T`` and ``P V``): a register tile of ``ROWS`` rows x one vector of columns
  accumulated in registers over ``k``, tiles spread over the cores.
- dlight's own CPU `GEMV` (a one-row matmul).
- `RowReduction` (LayerNorm, softmax): each row reduction rfactored into vector lanes, every
  loop nest parallel over rows; dlight's CPU `Reduction` takes what it declines.
- `Elementwise` (GELU, the activation quantizers, casts, transposes, gathers): producers
  inlined into one loop nest, flattened, vectorized by the target's vector width and
  parallel when it is big enough to pay for waking the thread pool.

`pipeline(target)` is TVM's CPU pipeline with `fast_math` first (vectorizable GELU, softmax,
exp) and these rules inserted right after fusion.
Functions already scheduled (our kernels carry ``tirx.is_scheduled``) are left alone; a
function no rule accepts keeps TVM's default lowering.
"""

from __future__ import annotations

import re

import tvm
from tvm import s_tir, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline, try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.s_tir.schedule import ScheduleError
from tvm.target.codegen import llvm_get_vector_width

from qcompiler.backends.tvm import symbolic
from qcompiler.backends.tvm.fast_math import fast_math

ROWS = 4  # rows of a matmul register tile
PARALLEL_MIN = 4096  # elements below which an elementwise loop stays on one thread


def vector_lanes(target: tvm.target.Target, bits: int = 32) -> int:
    width = llvm_get_vector_width(target)
    return max((width if width > 0 else 128) // bits, 2)


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


class Elementwise(CPUScheduleRule):
    """Functions made only of injective blocks: inline into the last, flatten, vectorize, go parallel."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        # A reduction over one element (a matmul with K = 1) normalizes to all-spatial iterators but keeps
        # its init: inlining and flattening it as elementwise work computed wrong values.
        if not infos or not all(info.is_injective() and sch.get(info.block_rv).init is None for info in infos):
            return None
        remaining = try_inline(sch, infos)
        lanes = vector_lanes(target)
        for info in remaining:
            loops = sch.get_loops(info.block_rv)
            if not loops:
                continue
            if any(_extent(sch, loop) is None for loop in loops):
                _schedule_symbolic(sch, loops, lanes)
                continue
            flat = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            total = _extent(sch, flat)
            if total is not None and total < lanes:
                continue
            outer, inner = sch.split(flat, factors=[None, lanes])
            sch.vectorize(inner)
            if total is None or total >= PARALLEL_MIN:
                sch.parallel(outer)
        return sch


def _schedule_symbolic(sch: s_tir.Schedule, loops: list, lanes: int) -> None:
    """A loop nest with symbolic extents: the static innermost loops vectorized, the rest fused and parallel.

    Flattening everything (the static case) would divide the flat index by symbolic extents
    for every element, and its vector loop would need a tail guard that stops vectorization:
    a 1 x 128 MiniLM ran 4x slower that way.
    """
    static = 0
    while static < len(loops) and _extent(sch, loops[len(loops) - 1 - static]) is not None:
        static += 1
    head, tail = loops[:len(loops) - static], loops[len(loops) - static:]
    sch.parallel(sch.fuse(*head) if len(head) > 1 else head[0])
    if not tail:
        return
    inner = sch.fuse(*tail) if len(tail) > 1 else tail[0]
    if _extent(sch, inner) % lanes == 0:
        sch.vectorize(sch.split(inner, factors=[None, lanes])[1])


class Matmul(CPUScheduleRule):
    """One ``S..S R`` block (batched matmul) with optional injective prologue and epilogue blocks."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if not infos:
            return None
        reductions = [info for info in infos if not info.is_injective()]
        if len(reductions) != 1 or reductions[0].dom_kind().count("R") != 1 or not reductions[0].dom_kind().endswith("R"):
            return None
        main = reductions[0].block_rv
        epilogues = [info.block_rv for info in infos[infos.index(reductions[0]) + 1:]]
        loops = sch.get_loops(main)
        if len(loops) < 3:
            return None  # a plain reduction (no i, j): dlight's Reduction rule's case
        *batch, i, j, k = loops
        lanes = vector_lanes(target)
        if _extent(sch, i) is None or _extent(sch, j) is None:
            # Symbolic rows or columns: pad them to whole tiles, so the vector loop needs no tail guard
            # (with one it is not vectorized; MiniLM's Q K^T at 1 x 128 took 10 ms that way).
            sch.pad_einsum(main, [1] * len(batch) + [ROWS, lanes, 1])
            for producer in sch.get_producers(main):
                sch.parallel(sch.get_loops(producer)[0])
            epilogues = _consumers_in_order(sch, main)
            *batch, i, j, k = sch.get_loops(main)
        rows = ROWS if (_extent(sch, i) or ROWS) % ROWS == 0 else 1
        i_outer, i_inner = sch.split(i, factors=[None, rows])
        j_outer, j_inner = sch.split(j, factors=[None, lanes])
        sch.reorder(*batch, i_outer, j_outer, k, i_inner, j_inner)
        accumulator = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(accumulator, j_outer)
        for epilogue in epilogues:
            sch.reverse_compute_inline(epilogue)
        # Loop annotations over the update go first: once its init is split off, the update no longer
        # counts as a reduction block and the schedule refuses to touch loops around it.
        sch.unroll(i_inner)
        sch.vectorize(j_inner)
        sch.parallel(sch.fuse(*batch, i_outer) if batch else i_outer)
        init = sch.decompose_reduction(main, k)
        for block in (init, accumulator):
            *_, row, column = sch.get_loops(block)
            sch.vectorize(column)
            if _extent(sch, row) is not None:  # a symbolic extent cannot be unrolled (the build fails)
                sch.unroll(row)
        return sch


def _consumers_in_order(sch: s_tir.Schedule, block) -> list:
    """The chain of blocks after ``block`` (each the only consumer of the one before), first to last."""
    chain = []
    consumers = sch.get_consumers(block)
    while len(consumers) == 1:
        chain.append(consumers[0])
        consumers = sch.get_consumers(consumers[0])
    return chain


class RowReduction(CPUScheduleRule):
    """Row-wise reductions followed by elementwise work (LayerNorm, softmax): each loop nest parallel over rows.

    A serial sum over a row is one dependency chain, bound by the add latency (dlight's CPU
    Reduction leaves it so: 118 us for a 128 x 384 LayerNorm). Here each reduction is split by
    the vector width and rfactored, so a row accumulates into one vector of independent lanes
    and only the last ``lanes`` partial sums are added serially (10 us for that LayerNorm).
    """

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or all(info.is_injective() for info in infos) or not infos[-1].is_injective():
            return None
        if not all(re.fullmatch("S+R?", info.dom_kind()) for info in infos):
            return None  # every block: spatial rows, then at most one trailing reduction axis
        reductions = [info.block_rv for info in infos if not info.is_injective()]
        # An elementwise block read twice (softmax's exponential: by the sum and by the output) keeps its
        # buffer; inlining it would compute it twice.
        elementwise = [info for info in infos[:-1] if info.is_injective()]
        shared = [info for info in elementwise if len(sch.get_consumers(info.block_rv)) > 1]
        kept = try_inline(sch, [info for info in elementwise if info not in shared]) + shared
        blocks = reductions + [info.block_rv for info in kept] + [infos[-1].block_rv]
        lanes = vector_lanes(target)
        for block in blocks:
            *rows, inner = sch.get_loops(block)
            if block in reductions:
                extent = _extent(sch, inner)
                if extent is not None and extent % lanes == 0 and extent >= 2 * lanes:
                    _, lane = sch.split(inner, factors=[None, lanes])
                    # The lanes become the last axis of the partial sums, so the vector stores are contiguous.
                    partial = sch.rfactor(lane, factor_axis=len(sch.get(block).writes[0].source.shape))
                    *partial_rows, _, partial_lane = sch.get_loops(partial)
                    sch.vectorize(partial_lane)
                    sch.parallel(sch.fuse(*partial_rows) if len(partial_rows) > 1 else partial_rows[0])
            else:
                _, vector = sch.split(inner, factors=[None, lanes])
                sch.vectorize(vector)
            if rows:
                sch.parallel(sch.fuse(*rows) if len(rows) > 1 else rows[0])
        return sch


def rules() -> list[CPUScheduleRule]:
    return [Matmul(), dlight.cpu.GEMV(), RowReduction(), dlight.cpu.Reduction(), Elementwise()]


def apply_schedules(target: tvm.target.Target) -> tvm.transform.Pass:
    """Schedule every unscheduled PrimFunc with the first rule that accepts it (rules that raise decline)."""
    return dlight.ApplyDefaultSchedule(*[_Declining(rule) for rule in rules()])


class _Declining(CPUScheduleRule):
    """A rule whose schedule primitive errors (a shape it does not fit) declines instead of failing the build.

    Beyond ScheduleError, TVM 0.27 raises InternalError (a RuntimeError) from
    reverse_compute_inline on an RMSNorm-fed matmul at batch 2 ("Cannot dispatch a null
    expression"), and dlight's GEMV asserts on a one-token attention product with no
    reduction loop left: the next rule takes those functions.
    """

    def __init__(self, rule: CPUScheduleRule) -> None:
        self.rule = rule

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool) -> s_tir.Schedule | None:
        try:
            return self.rule.apply(func, target, tunable)
        except (ScheduleError, ValueError, RuntimeError, AssertionError):
            return None


def pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's default CPU pipeline with `fast_math` first and `apply_schedules` after legalization and fusion.

    `symbolic.keep_shape_tensors_apart` runs before fusion (symbolic-shape libraries need it).
    """

    @tvm.transform.module_pass(opt_level=0, name="QCompilerCPUPipeline")
    def run(module: tvm.IRModule, _context: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            legalize = cpu_pipeline.legalize_passes(target)
            fuse = [p.info.name for p in legalize].index("FuseOps")
            passes = ([fast_math] + cpu_pipeline.library_dispatch_passes(target) + legalize[:fuse]
                      + [symbolic.keep_shape_tensors_apart] + legalize[fuse:]
                      + [apply_schedules(target)] + cpu_pipeline.dataflow_lower_passes(target)
                      + cpu_pipeline.finalize_passes(target))
            return tvm.transform.Sequential(passes)(module)

    return run
