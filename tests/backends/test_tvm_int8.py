"""The TVM int8 x int8 -> int32 matmul (AVX-512 VNNI), float X quantized inside, against numpy."""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not importable, so the TVM backend cannot compile kernels")

from qcompiler.backends.tvm.compiled import ALIGNMENT, aligned_empty, huge_page_copy  # noqa: E402
from qcompiler.backends.tvm.int8_matmul import TILE, build, has_vnni, pack_weights  # noqa: E402
from tests.backends.kernels import activations, quantized  # noqa: E402

pytestmark = pytest.mark.skipif(not has_vnni(), reason="this CPU has no AVX-512 VNNI, which the int8 kernel needs")

# (M, K, N): K not a multiple of 4, N ragged against the 64-column tile, M not a multiple of 4 rows;
# below 4 rows X is quantized on the calling thread, from 4 rows on in parallel.
SHAPES = [(1, 384, 64), (1, 100, 130), (2, 97, 37), (5, 100, 37), (3, 97, 130), (128, 384, 1536), (7, 1536, 384)]
STATIC = (2.0 ** -5, 3)  # scale and zero point of a static quantizer
CASES = [(shape, None) for shape in SHAPES] + [((1, 100, 130), STATIC), ((5, 100, 37), STATIC)]


@functools.lru_cache(maxsize=None)
def kernel(m: int, k: int, n: int, static: bool):
    return build(m, k, n, static)


@pytest.mark.parametrize("shape, static", CASES, ids=lambda case: str(case) if case else "per-token")
def test_matches_the_integer_product(shape, static):
    m, k, n = shape
    rng = np.random.default_rng(m + k + n)
    codes = rng.integers(-128, 128, (k, n)).astype(np.int8)  # -128 included: the full int8 range
    scale = rng.uniform(0.001, 0.01, n).astype(np.float32)
    x = activations(rng, m, k)
    y = kernel(m, k, n, static is not None)(x, pack_weights(codes, scale, static))
    q, row_scale = quantized(x, static)
    expected = row_scale[:, None].astype(np.float64) * scale[None, :] * (q.astype(np.int64) @ codes.astype(np.int64))
    assert y.shape == (m, n) and y.dtype == np.float32
    # The int32 sum is exact; only the float epilogue rounds.
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_calls_share_no_memory_and_take_any_layout():
    """Aligned X is shared, unaligned, strided or read-only X staged; each call returns a new aligned array."""
    m, k, n = 3, 97, 130
    rng = np.random.default_rng(1)
    weights = pack_weights(rng.integers(-128, 128, (k, n)).astype(np.int8), rng.uniform(0.001, 0.01, n))
    matmul = kernel(m, k, n, False)
    wide = rng.standard_normal((m, 2 * k + 1)).astype(np.float32)
    x = aligned_empty((m, k))
    x[...] = wide[:, 1:k + 1]
    first = matmul(x, weights)
    second = matmul(x, matmul.upload(weights))
    assert first is not second and first.__array_interface__["data"][0] % ALIGNMENT == 0
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(matmul(wide[:, 1:k + 1], weights), first)  # unaligned view
    np.testing.assert_array_equal(matmul(np.asfortranarray(x), weights), first)
    read_only = x.copy()
    read_only.flags.writeable = False
    np.testing.assert_array_equal(matmul(read_only, weights), first)


def test_weights_are_uploaded_as_page_aligned_copies():
    weights = pack_weights(np.random.default_rng(2).integers(-128, 128, (97, 130)).astype(np.int8), np.ones(130))
    for value in weights.values():
        copy = huge_page_copy(value)
        assert copy.__array_interface__["data"][0] % 4096 == 0 and copy.flags.writeable
        np.testing.assert_array_equal(copy, value)
        assert copy.dtype == value.dtype and copy.shape == value.shape


def test_packed_layout_is_the_documented_one():
    k, n = 97, 70
    codes = np.random.default_rng(0).integers(-128, 128, (k, n)).astype(np.int8)
    packed = pack_weights(codes, np.ones(n, np.float32))
    assert packed["packed"].shape == (2, 25, 4 * TILE) and "activation" not in packed
    # packed[t, q, 64 j + 4 l + i] = W[4 q + i, 64 t + 16 j + l]
    t, q, j, l, i = 1, 3, 0, 5, 2
    assert packed["packed"][t, q, 64 * j + 4 * l + i] == codes[4 * q + i, 64 * t + 16 * j + l]
    last_tile = packed["packed"][1].reshape(25, 4, 16, 4)  # [q, j, l, i]: columns 64 + 16 j + l
    assert not last_tile[:, 0, 6:].any() and not last_tile[:, 1:].any()  # columns 70.. are padding
    np.testing.assert_array_equal(packed["zcorr"][:n], 128 * codes.astype(np.int32).sum(axis=0))
    static = pack_weights(codes, np.ones(n, np.float32), (0.5, -3))
    np.testing.assert_array_equal(static["zcorr"][:n], 125 * codes.astype(np.int32).sum(axis=0))
    np.testing.assert_array_equal(static["activation"], np.array([0.5, -3], np.float32))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="int8"):
        pack_weights(np.zeros((4, 4), np.int16), np.ones(4))
    with pytest.raises(ValueError, match="positive"):
        build(0, 4, 4)
    with pytest.raises(ValueError, match="VNNI"):
        build(4, 4, 4, target={"kind": "llvm", "mcpu": "skylake"})
    with pytest.raises(ValueError, match="built for"):
        kernel(1, 384, 64, False)(np.zeros((2, 384), np.float32), pack_weights(np.zeros((384, 64), np.int8), 1.0))
    with pytest.raises(ValueError, match="activation"):
        kernel(1, 384, 64, True).upload(pack_weights(np.zeros((384, 64), np.int8), 1.0))
