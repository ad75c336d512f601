"""qcompiler's online rotation as a TIR kernel for CPUs: ``Y = X @ (A kron B)`` along the last axis.

This is what the ``qcompiler.Hadamard(x, A, B)`` node of the rotate pass computes
(`qcompiler.online_rotation`). With ``n = a * b`` and each row of ``X`` viewed as an ``[a, b]``
matrix, the math, in two lines::

    Y_row = A^T X_row B                                   (X_row, Y_row: [a, b], row-major)
    A = H_a / sqrt(a) (Sylvester)  =>  Y_row = FWHT_a(X_row B / sqrt(a))   (log2 a butterfly stages)

Fast path (``A`` is the normalized power-of-two Sylvester matrix, checked numerically): each row
is first multiplied on the right by the small dense ``B / sqrt(a)`` (the scale folded into ``B``,
so it costs nothing), then an in-place fast Walsh-Hadamard butterfly runs along the ``a`` axis,
where every butterfly adds and subtracts two contiguous ``b``-float vectors. When ``B`` is also
Sylvester (``n`` a power of two, e.g. ``factor_pair(4096) = (H_64, H_64)``), ``A kron B`` is the
Sylvester ``H_n`` itself, so the kernel regroups it as ``H_{n/16} kron H_16``: a 16-wide dense
product (one AVX-512 vector) and ``log2(n) - 4`` butterfly stages. Otherwise (``A`` not Sylvester)
both sides are small dense products. Rows are split over the TVM thread pool (``TVM_NUM_THREADS``,
defaulted by `int4_matmul` to the CPU count); the ``b`` axis, contiguous in memory, is vectorized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from qcompiler.backends.tvm.int4_matmul import default_target
from qcompiler.hadamard import hadamard_matrix, is_sylvester

DENSE_WIDTH = 16  # inner dense width when all of A kron B is Sylvester: one AVX-512 float32 vector


def fast_kernel(rows: int, a: int, b: int) -> tvm.tirx.PrimFunc:
    """``Y_row = FWHT_a(X_row @ Bs)`` with ``Bs`` (the scaled dense factor) a kernel argument."""
    n, stages = a * b, int(math.log2(a))

    @T.prim_func
    def hadamard(X: T.Buffer((rows, n), "float32"), Bs: T.Buffer((b, b), "float32"),
                 Y: T.Buffer((rows, n), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for r in T.parallel(rows):
            u = T.decl_buffer((b,), "float32")  # one butterfly input, per thread
            # Dense side: each length-b piece of the row times Bs, accumulated as b-wide vectors.
            for i in range(a):
                for l in T.vectorized(b):
                    Y[r, i * b + l] = T.float32(0)
                for j in range(b):
                    for l in T.vectorized(b):
                        Y[r, i * b + l] = Y[r, i * b + l] + X[r, i * b + j] * Bs[j, l]
            # Butterfly side, in place: stage s pairs pieces lo and lo + 2^s; t enumerates the a/2 pairs.
            for s in range(stages):
                for t in range(a // 2):
                    for l in T.vectorized(b):
                        lo = T.meta_var(((t >> s) << (s + 1)) + (t & ((1 << s) - 1)))
                        # A buffer, not a let: TVM's vectorizer miscompiles a let here (stale values).
                        u[l] = Y[r, lo * b + l]
                        Y[r, lo * b + l] = u[l] + Y[r, (lo + (1 << s)) * b + l]
                        Y[r, (lo + (1 << s)) * b + l] = u[l] - Y[r, (lo + (1 << s)) * b + l]

    return hadamard


def dense_kernel(rows: int, a: int, b: int) -> tvm.tirx.PrimFunc:
    """``Y_row = A^T (X_row B)`` with both factors dense: the fallback for non-Sylvester ``A``."""
    n = a * b

    @T.prim_func
    def hadamard(X: T.Buffer((rows, n), "float32"), At: T.Buffer((a, a), "float32"),
                 Bm: T.Buffer((b, b), "float32"), Y: T.Buffer((rows, n), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for r in T.parallel(rows):
            right = T.decl_buffer((n,), "float32")  # X_row B, one row per thread
            for i in range(a):
                for l in T.vectorized(b):
                    right[i * b + l] = T.float32(0)
                for j in range(b):
                    for l in T.vectorized(b):
                        right[i * b + l] = right[i * b + l] + X[r, i * b + j] * Bm[j, l]
            for k in range(a):
                for l in T.vectorized(b):
                    Y[r, k * b + l] = T.float32(0)
                for i in range(a):
                    for l in T.vectorized(b):
                        Y[r, k * b + l] = Y[r, k * b + l] + At[k, i] * right[i * b + l]

    return hadamard


@dataclass
class Hadamard:
    """One compiled ``(rows, A, B)``: ``rotate(x)`` returns ``x @ (A kron B)`` as float32 numpy.

    ``path`` is ``"fwht"`` or ``"dense"``; ``a`` and ``b`` are the kernel's own split of ``n``
    (which differs from the factors' when all of ``A kron B`` is Sylvester).
    """

    executable: tvm.runtime.Executable
    rows: int
    n: int
    a: int
    b: int
    path: str
    factors: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        self._main = self.executable["main"]
        self._device = tvm.cpu()
        # The factors are uploaded once, so calls copy only x and y.
        self._factors = [tvm.runtime.tensor(np.ascontiguousarray(f, np.float32), self._device) for f in self.factors]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if x.shape != (self.rows, self.n):
            raise ValueError(f"x is {x.shape}, this kernel was built for {(self.rows, self.n)}")
        y = tvm.runtime.empty((self.rows, self.n), "float32", self._device)
        self._main(tvm.runtime.tensor(x, self._device), *self._factors, y)
        return y.numpy()


@dataclass
class KernelPlan:
    """The kernel for one ``(rows, A, B)`` before compilation: its function and the factors it takes."""

    func: tvm.tirx.PrimFunc
    factors: tuple[np.ndarray, ...]
    path: str
    a: int
    b: int


def plan(rows: int | tvm.tirx.Var, a_matrix: np.ndarray, b_matrix: np.ndarray) -> KernelPlan:
    """Pick the path from ``A`` and ``B`` and write the kernel for ``x`` of shape ``[rows, a * b]``.

    ``rows`` is a number or a symbolic int64 variable (a kernel for any number of rows).
    """
    a_matrix, b_matrix = np.asarray(a_matrix, np.float64), np.asarray(b_matrix, np.float64)
    a, b = a_matrix.shape[0], b_matrix.shape[0]
    if (isinstance(rows, int) and rows < 1) or a_matrix.shape != (a, a) or b_matrix.shape != (b, b):
        raise ValueError(f"need rows >= 1 and square factors, got rows={rows}, {a_matrix.shape}, {b_matrix.shape}")
    n = a * b
    if is_sylvester(a_matrix) and is_sylvester(b_matrix):
        # H_a kron H_b = H_n: regroup as H_{n/w} kron H_w with w one vector wide.
        b = min(n, DENSE_WIDTH)
        a = n // b
        return KernelPlan(fast_kernel(rows, a, b), (hadamard_matrix(b) / math.sqrt(n),), "fwht", a, b)
    if is_sylvester(a_matrix):
        return KernelPlan(fast_kernel(rows, a, b), (b_matrix / math.sqrt(a),), "fwht", a, b)
    return KernelPlan(dense_kernel(rows, a, b), (a_matrix.T, b_matrix), "dense", a, b)


def build(rows: int, a_matrix: np.ndarray, b_matrix: np.ndarray,
          target: tvm.target.Target | str | dict | None = None) -> Hadamard:
    """Compile ``x @ (A kron B)`` for ``x`` of shape ``[rows, a * b]``."""
    chosen = plan(rows, a_matrix, b_matrix)
    target = default_target() if target is None else tvm.target.Target(target)
    return Hadamard(tvm.compile(tvm.IRModule({"main": chosen.func}), target), rows, chosen.a * chosen.b,
                    chosen.a, chosen.b, chosen.path, chosen.factors)
