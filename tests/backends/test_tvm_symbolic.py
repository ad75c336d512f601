"""Libraries for any shape: kernels for a symbolic M, and the importer fixes that keep shapes symbolic."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="apache-tvm is not importable, so the TVM backend cannot compile kernels")

from qcompiler.backends.tvm import hadamard, int4_matmul, int8_matmul, symbolic, w4a8_matmul  # noqa: E402
from qcompiler.backends.tvm.int4_matmul import default_target  # noqa: E402

ROWS = (1, 3, 5, 40)  # a GEMV, a ragged 4-row tile, more than one tile, the large-M schedules
K, N, GROUP = 200, 130, 64  # K not a multiple of the group, N not of the 64-column tile


def _symbolic(func: tvm.tirx.PrimFunc):
    return tvm.compile(tvm.IRModule({"main": func}), default_target())["main"]


def _run(main, x: np.ndarray, weights: list[np.ndarray], n: int) -> np.ndarray:
    y = tvm.runtime.tensor(np.zeros((x.shape[0], n), np.float32))
    main(tvm.runtime.tensor(x), *[tvm.runtime.tensor(w) for w in weights], y)
    return y.numpy()


@pytest.fixture(scope="module")
def int4_weights():
    rng = np.random.default_rng(0)
    groups = -(-K // GROUP)
    return (rng.integers(0, 16, (K, N)).astype(np.uint8), rng.random((groups, N)).astype(np.float32) + 0.1,
            rng.integers(0, 16, (groups, N)).astype(np.uint8))


def _rows_var():
    return tvm.tirx.Var("m", "int64")


@pytest.mark.parametrize("schedule, rows", [("gemv", 1), ("gemv", None), ("gemm", None)])
def test_int4_kernel_for_any_m_equals_the_one_built_for_each_m(int4_weights, schedule, rows):
    packed = int4_matmul.pack_weights(*int4_weights, GROUP)
    weights = [packed[name] for name in ("packed", "scale", "zero")]
    main = _symbolic(int4_matmul.scheduled(_rows_var(), K, N, GROUP, schedule, rows=rows))
    for m in ROWS:
        x = np.random.default_rng(m).standard_normal((m, K)).astype(np.float32)
        expected = int4_matmul.build(m, K, N, GROUP, schedule=schedule)(x, packed)
        np.testing.assert_array_equal(_run(main, x, weights, N), expected)


@pytest.mark.skipif(not int8_matmul.has_vnni(), reason="no AVX-512 VNNI on this CPU")
@pytest.mark.parametrize("rows", [1, None])
def test_w4a8_kernel_for_any_m_equals_the_one_built_for_each_m(int4_weights, rows):
    packed = w4a8_matmul.pack_weights(*int4_weights, GROUP)
    weights = [packed[name] for name in ("packed", "scale", "zero")]
    main = _symbolic(w4a8_matmul.kernel(_rows_var(), K, N, GROUP, rows=rows))
    for m in ROWS:
        x = np.random.default_rng(m).standard_normal((m, K)).astype(np.float32)
        np.testing.assert_array_equal(_run(main, x, weights, N), w4a8_matmul.build(m, K, N, GROUP)(x, packed))


@pytest.mark.skipif(not int8_matmul.has_vnni(), reason="no AVX-512 VNNI on this CPU")
@pytest.mark.parametrize("static, rows", [(False, 1), (False, None), (True, None)])
def test_int8_kernel_for_any_m_equals_the_one_built_for_each_m(static, rows):
    rng = np.random.default_rng(1)
    codes = rng.integers(-127, 128, (K, N)).astype(np.int8)
    packed = int8_matmul.pack_weights(codes, rng.random(N).astype(np.float32), (0.05, 3) if static else None)
    names = ("packed", "zcorr", "scale") + (("activation",) if static else ())
    main = _symbolic(int8_matmul.kernel(_rows_var(), K, N, static, rows=rows))
    for m in ROWS:
        x = np.random.default_rng(m).standard_normal((m, K)).astype(np.float32)
        expected = int8_matmul.build(m, K, N, static)(x, packed)
        np.testing.assert_array_equal(_run(main, x, [packed[name] for name in names], N), expected)


def test_hadamard_kernel_for_any_number_of_rows():
    a, b = hadamard.hadamard_matrix(16), np.eye(3)
    chosen = hadamard.plan(_rows_var(), a, b)
    main = _symbolic(chosen.func)
    for m in (1, 7):
        x = np.random.default_rng(m).standard_normal((m, 48)).astype(np.float32)
        y = tvm.runtime.tensor(np.zeros_like(x))
        main(tvm.runtime.tensor(x), *[tvm.runtime.tensor(np.ascontiguousarray(f, np.float32)) for f in chosen.factors],
             y)
        np.testing.assert_allclose(y.numpy(), x @ np.kron(a, b), atol=1e-5)


def test_the_inferred_dimension_cancels_shared_factors():
    batch, past, sequence = (tvm.tirx.Var(name, "int64") for name in ("batch", "past", "sequence"))
    total = past + sequence
    analyzer = tvm.sym.Analyzer()
    # grouped-query attention's head repetition: [batch, 4, p + s, 16] -> [-1, p + s, 16]
    inferred = symbolic.infer_dimension([batch, tvm.tirx.IntImm("int64", 4), total, tvm.tirx.IntImm("int64", 16)],
                                        [total, tvm.tirx.IntImm("int64", 16)])
    assert analyzer.can_prove_equal(inferred, batch * 4)
    # a size that does not divide is left to TVM's own conversion
    assert symbolic.infer_dimension([batch, tvm.tirx.IntImm("int64", 6)], [tvm.tirx.IntImm("int64", 4)]) is None
    assert symbolic.infer_dimension([batch, sequence], [past]) is None
