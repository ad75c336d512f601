"""The TVM online-rotation kernel against qcompiler's numpy reference, on both of its paths."""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not importable, so the TVM backend cannot compile kernels")

from qcompiler.backends.tvm.hadamard import build

from qcompiler.online_rotation import factor_pair, rotate_last_axis

# factor_pair(n) -> (A, B): 384 = 32 x 12, 768 = 64 x 12, 1536 = 128 x 12 (Sylvester A, Paley-type B),
# 64 = 8 x 8 and 4096 = 64 x 64 (all Sylvester), 12 = 1 x 12, 40 = 2 x 20, 172 = 4 x 43.
SIZES = [384, 768, 1536, 64, 4096, 12, 40, 172]
ROWS = [1, 37]


@functools.cache
def kernel(rows: int, n: int):
    a, b = factor_pair(n)
    return build(rows, a, b)


def check(rotate, x: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    expected = rotate_last_axis(x.astype(np.float64), a, b)
    np.testing.assert_allclose(rotate(x), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference(rows: int, n: int) -> None:
    x = np.random.default_rng(n + rows).standard_normal((rows, n)).astype(np.float32)
    check(kernel(rows, n), x, *factor_pair(n))


def test_paths() -> None:
    """Sylvester A takes the butterfly; an all-Sylvester n is regrouped to a 16-wide dense side."""
    assert (kernel(1, 384).path, kernel(1, 384).a, kernel(1, 384).b) == ("fwht", 32, 12)
    assert (kernel(1, 4096).path, kernel(1, 4096).a, kernel(1, 4096).b) == ("fwht", 256, 16)


@pytest.mark.parametrize("rows", ROWS)
def test_dense_fallback(rows: int) -> None:
    """A non-Sylvester A (a random orthogonal 8 x 8) goes through two dense products."""
    rng = np.random.default_rng(rows)
    a = np.linalg.qr(rng.standard_normal((8, 8)))[0]
    b = factor_pair(12)[1]
    rotate = build(rows, a, b)
    assert rotate.path == "dense"
    check(rotate, rng.standard_normal((rows, 96)).astype(np.float32), a, b)


def test_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError):
        kernel(1, 384)(np.zeros((2, 384), np.float32))
