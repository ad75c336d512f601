"""Latency of the TVM online-rotation kernel beside onnxruntime and numpy, rows = 1024.

    [BENCH_THREADS=T] .venv/bin/python benchmarks/tvm_hadamard.py [--runs N]

``y = x @ (A kron B)`` with ``(A, B) = factor_pair(n)``, the op the rotate pass inserts
(``qcompiler.Hadamard``), for n in (384, 1536, 4096). Three implementations, run interleaved
(TVM, ORT, numpy, TVM, ...) in one process so each sees the same machine noise; the medians and
their ratio to TVM's are what to read. Each call takes a numpy x and returns a numpy y.

- TVM: `qcompiler.backends.tvm.hadamard` (butterfly along A, dense B; all-Sylvester n regrouped).
- ORT: the body of qcompiler's ``Hadamard`` function as a plain graph (Reshape, MatMul B,
  Transpose, MatMul A, Transpose, Reshape), A and B as initializers.
- numpy: dense ``x @ np.kron(A, B)`` (float32 BLAS), the O(n^2) baseline.

Thread pools do not spin between calls (``TVM_THREAD_POOL_SPIN_COUNT=0``, ORT
``session.intra_op.allow_spinning=0``), since an idle spinning pool steals the other's cores
when interleaved. Every result is checked against `rotate_last_axis` before timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

THREADS = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))
os.environ["TVM_NUM_THREADS"] = str(THREADS)
os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = "0"
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from qcompiler.backends.tvm.hadamard import build

from qcompiler.online_rotation import factor_pair, rotate_last_axis

ROWS = 1024
SIZES = (384, 1536, 4096)


def ort_session(rows: int, a: np.ndarray, b: np.ndarray, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """qcompiler's Hadamard function body as a one-graph model (same ops as ``_function()``)."""
    n = a.shape[0] * b.shape[0]
    inits = [numpy_helper.from_array(a.astype(np.float32), "A"), numpy_helper.from_array(b.astype(np.float32), "B"),
             numpy_helper.from_array(np.array([-1, a.shape[0], b.shape[0]], np.int64), "grouped_shape"),
             numpy_helper.from_array(np.array([rows, n], np.int64), "shape")]
    nodes = [helper.make_node("Reshape", ["x", "grouped_shape"], ["grouped"]),
             helper.make_node("MatMul", ["grouped", "B"], ["xb"]),
             helper.make_node("Transpose", ["xb"], ["right"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["right", "A"], ["xba"]),
             helper.make_node("Transpose", ["xba"], ["both"], perm=[0, 2, 1]),
             helper.make_node("Reshape", ["both", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "hadamard", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def interleaved(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median seconds per implementation, one run of each per round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {THREADS} threads, rows={ROWS}, {args.runs} interleaved runs")
    print(f"{'n':>5} {'A x B':>10} {'path':>5} | {'TVM ms':>8} {'ORT ms':>8} {'numpy ms':>9} | {'ORT/TVM':>7} {'np/TVM':>7}")
    for n in SIZES:
        a, b = factor_pair(n)
        x = np.random.default_rng(n).standard_normal((ROWS, n)).astype(np.float32)
        dense = np.kron(a, b).astype(np.float32)
        tvm_fn, ort_fn = build(ROWS, a, b), ort_session(ROWS, a, b, THREADS)
        expected = rotate_last_axis(x.astype(np.float64), a, b)
        for name, y in (("TVM", tvm_fn(x)), ("ORT", ort_fn(x)), ("numpy", x @ dense)):
            np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=name)
        fns = {"tvm": lambda t=tvm_fn, x=x: t(x), "ort": lambda o=ort_fn, x=x: o(x), "np": lambda x=x, d=dense: x @ d}
        med = interleaved(fns, args.runs)
        print(f"{n:>5} {f'{a.shape[0]}x{b.shape[0]}':>10} {tvm_fn.path:>5} | {med['tvm'] * 1e3:8.3f} "
              f"{med['ort'] * 1e3:8.3f} {med['np'] * 1e3:9.3f} | {med['ort'] / med['tvm']:7.2f} {med['np'] / med['tvm']:7.2f}")


if __name__ == "__main__":
    main()
