"""The TVM W4A8 kernel (float X quantized to int8 per token x 4-bit grouped weights on AVX-512 VNNI) against numpy."""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not importable, so the TVM backend cannot compile kernels")

from qcompiler.backends.tvm.int8_matmul import has_vnni  # noqa: E402
from qcompiler.backends.tvm.w4a8_matmul import TILE, build, pack_weights  # noqa: E402
from tests.backends.kernels import activations, quantized  # noqa: E402

pytestmark = pytest.mark.skipif(not has_vnni(), reason="this CPU has no AVX-512 VNNI, which the W4A8 kernel needs")

# (M, K, N, group): K not a multiple of the group, N ragged against the 32-column tile, M below and
# above the 4-row tile (X quantized on the calling thread below 4 rows, in parallel from 4), per
# channel (one group of K), and MiniLM's FFN shape.
SHAPES = [(1, 384, 384, 128), (1, 200, 37, 100), (2, 97, 130, 32), (5, 200, 37, 64), (3, 97, 130, 32),
          (7, 100, 64, 100), (128, 1536, 384, 128)]


@functools.lru_cache(maxsize=None)
def kernel(m: int, k: int, n: int, group: int):
    return build(m, k, n, group)


@pytest.mark.parametrize("m, k, n, group", SHAPES, ids=str)
def test_matches_the_integer_product(m, k, n, group):
    rng = np.random.default_rng(m + k + n)
    groups = -(-k // group)
    codes = rng.integers(0, 16, (k, n)).astype(np.uint8)
    zero = rng.integers(0, 16, (groups, n)).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, (groups, n)).astype(np.float32)
    x = activations(rng, m, k)
    y = kernel(m, k, n, group)(x, pack_weights(codes, scale, zero, group))
    q, row_scale = quantized(x, None)
    q = q.astype(np.int64)
    per_k = lambda a: np.repeat(a, group, axis=0)[:k]  # noqa: E731
    exact = [(q[:, g * group:(g + 1) * group] @ (codes.astype(np.int64) - per_k(zero))[g * group:(g + 1) * group])
             for g in range(groups)]  # one exact integer sum per group
    expected = row_scale[:, None].astype(np.float64) * sum(e * scale[g] for g, e in enumerate(exact))
    assert y.shape == (m, n) and y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_packed_layout_is_the_documented_one():
    k, n, group = 64, 40, 32
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (k, n)).astype(np.uint8)
    zero = rng.integers(0, 16, (2, n)).astype(np.uint8)
    packed = pack_weights(codes, np.ones((2, n), np.float32), zero, group)
    assert packed["packed"].shape == (2, 16, 64)
    # byte 4 l + i of packed[t, q] = c[4 q + i, 32 t + l] | c[4 q + i, 32 t + 16 + l] << 4
    t, q, l, i = 0, 9, 5, 3
    byte = packed["packed"][t, q, 4 * l + i]
    assert byte & 15 == codes[4 * q + i, TILE * t + l] and byte >> 4 == codes[4 * q + i, TILE * t + 16 + l]
    assert set(packed) == {"packed", "scale", "zero"} and packed["zero"].dtype == np.uint8
    # scale and zero: [tile, group, l] is column 32 tile + l of the group
    assert packed["zero"].shape == (2, 2, TILE) and packed["zero"][1, 1, 3] == zero[1, TILE + 3]
    np.testing.assert_array_equal(packed["scale"].transpose(1, 0, 2).reshape(2, 2 * TILE)[:, :n], np.ones((2, n)))
    assert not packed["scale"][1, :, n - TILE:].any()  # columns 40.. are padding


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="0..15"):
        pack_weights(np.full((4, 4), 16, np.uint8), np.ones((1, 4)), np.zeros((1, 4)), 4)
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_weights(np.zeros((6, 4), np.uint8), np.ones((2, 4)), np.zeros((2, 4)), 3)
    with pytest.raises(ValueError, match="positive"):
        build(0, 4, 4, 4)
    with pytest.raises(ValueError, match="VNNI"):
        build(4, 4, 4, 4, target={"kind": "llvm", "mcpu": "skylake"})
