"""The TVM int8 x int8 -> int32 matmul (AVX-512 VNNI) against numpy's integer product."""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not importable, so the TVM backend cannot compile kernels")

from qcompiler.backends.tvm.int8_matmul import TILE, build, has_vnni, pack_weights  # noqa: E402

pytestmark = pytest.mark.skipif(not has_vnni(), reason="this CPU has no AVX-512 VNNI, which the int8 kernel needs")

# (M, K, N): K not a multiple of 4, N ragged against the 64-column tile, M not a multiple of 4 rows.
SHAPES = [(1, 384, 64), (5, 100, 37), (3, 97, 130), (128, 384, 1536), (7, 1536, 384)]


@functools.lru_cache(maxsize=None)
def kernel(m: int, k: int, n: int):
    return build(m, k, n)


def reference(x_u8: np.ndarray, zero_u8: int, codes: np.ndarray, row_scale: np.ndarray, scale: np.ndarray) -> np.ndarray:
    exact = (x_u8.astype(np.int64) - zero_u8) @ codes.astype(np.int64)
    return row_scale[:, None].astype(np.float64) * scale[None, :] * exact


@pytest.mark.parametrize("m, k, n", SHAPES, ids=str)
@pytest.mark.parametrize("zero_u8", [128, 131], ids=["symmetric", "static-zero-point"])
def test_matches_the_integer_product(m, k, n, zero_u8):
    rng = np.random.default_rng(m + k + n)
    codes = rng.integers(-128, 128, (k, n)).astype(np.int8)  # -128 included: the full int8 range
    scale = rng.uniform(0.001, 0.01, n).astype(np.float32)
    x_u8 = rng.integers(0, 256, (m, k)).astype(np.uint8)
    row_scale = rng.uniform(0.01, 0.1, m).astype(np.float32)
    y = kernel(m, k, n)(x_u8, row_scale, pack_weights(codes, scale, zero_u8))
    expected = reference(x_u8, zero_u8, codes, row_scale, scale)
    assert y.shape == (m, n) and y.dtype == np.float32
    # The int32 sum is exact; only the float epilogue rounds.
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_packed_layout_is_the_documented_one():
    k, n = 97, 70
    codes = np.random.default_rng(0).integers(-128, 128, (k, n)).astype(np.int8)
    packed = pack_weights(codes, np.ones(n, np.float32), 128)
    assert packed["packed"].shape == (2, 25, 4 * TILE)
    # packed[t, q, 64 j + 4 l + i] = W[4 q + i, 64 t + 16 j + l]
    t, q, j, l, i = 1, 3, 0, 5, 2
    assert packed["packed"][t, q, 64 * j + 4 * l + i] == codes[4 * q + i, 64 * t + 16 * j + l]
    last_tile = packed["packed"][1].reshape(25, 4, 16, 4)  # [q, j, l, i]: columns 64 + 16 j + l
    assert not last_tile[:, 0, 6:].any() and not last_tile[:, 1:].any()  # columns 70.. are padding
    np.testing.assert_array_equal(packed["zcorr"][:n], 128 * codes.astype(np.int32).sum(axis=0))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="int8"):
        pack_weights(np.zeros((4, 4), np.int16), np.ones(4), 128)
    with pytest.raises(ValueError, match="positive"):
        build(0, 4, 4)
    with pytest.raises(ValueError, match="VNNI"):
        build(4, 4, 4, target={"kind": "llvm", "mcpu": "skylake"})
