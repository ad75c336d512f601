"""The TVM fused int4 matmul against numpy, on ragged shapes, through both CPU schedules."""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not importable, so the TVM backend cannot compile kernels")

from qcompiler.backends.tvm.int4_matmul import TILE, build, pack_weights  # noqa: E402
from qcompiler.quant.spec import QuantSpec, quantize  # noqa: E402

# (M, K, N, group): K ragged against the group and odd, N odd, one row and a few rows.
ODD_SHAPES = [(1, 200, 37, 64), (5, 97, 37, 32), (1, 97, 130, 32), (5, 200, 48, 64), (3, 101, 70, 33)]
MINILM = (16, 384, 1536, 128)  # one token block of a MiniLM FFN up-projection


@functools.lru_cache(maxsize=None)
def kernel(m: int, k: int, n: int, group: int, schedule: str | None = None):
    """One compile per shape and schedule for the whole module."""
    return build(m, k, n, group, schedule=schedule)


def random_weights(k: int, n: int, group: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = -(-k // group)
    codes = rng.integers(0, 16, (k, n)).astype(np.uint8)
    scale = rng.uniform(0.005, 0.05, (groups, n)).astype(np.float32)
    zero = rng.integers(0, 16, (groups, n)).astype(np.uint8)
    return codes, scale, zero


def reference(x: np.ndarray, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> np.ndarray:
    """``x @ ((codes - zero) * scale)`` with the group parameters repeated along K, in float64."""
    k = codes.shape[0]
    zero_rep = np.repeat(zero.astype(np.float64), group, axis=0)[:k]
    scale_rep = np.repeat(scale.astype(np.float64), group, axis=0)[:k]
    return x.astype(np.float64) @ ((codes - zero_rep) * scale_rep)


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Within 1e-4 of the output's scale (float32 accumulation over K terms)."""
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("schedule", ["gemv", "gemm"])
@pytest.mark.parametrize("m, k, n, group", ODD_SHAPES, ids=lambda v: str(v))
def test_odd_shapes_match_numpy(m, k, n, group, schedule):
    codes, scale, zero = random_weights(k, n, group, seed=k + n)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    y = kernel(m, k, n, group, schedule)(x, pack_weights(codes, scale, zero, group))
    assert y.shape == (m, n) and y.dtype == np.float32
    assert_close(y, reference(x, codes, scale, zero, group))


@pytest.mark.parametrize("shift", [0.0, 3.0], ids=["centred", "positive-mean"])
def test_minilm_shape_matches_numpy(shift):
    # A positive mean makes sum(x) * zero large against the result: the regrouped math must not cancel badly.
    m, k, n, group = MINILM
    codes, scale, zero = random_weights(k, n, group, seed=1)
    x = (np.random.default_rng(2).standard_normal((m, k)) + shift).astype(np.float32)
    matmul = kernel(m, k, n, group)
    weights = matmul.upload(pack_weights(codes, scale, zero, group))
    assert matmul.schedule == "gemv"
    assert_close(matmul(x, weights), reference(x, codes, scale, zero, group))


def test_many_rows_use_the_decoded_tile_schedule():
    m, k, n, group = 40, 200, 37, 64
    codes, scale, zero = random_weights(k, n, group, seed=3)
    x = np.random.default_rng(4).standard_normal((m, k)).astype(np.float32)
    matmul = kernel(m, k, n, group)
    assert matmul.schedule == "gemm"
    assert_close(matmul(x, pack_weights(codes, scale, zero, group)), reference(x, codes, scale, zero, group))


def test_weights_from_the_quantizer_give_its_dequantized_product():
    # The blocked uint4 DequantizeLinear layout qcompiler's quantizer produces, straight into pack_weights.
    m, k, n, group = 5, 200, 37, 64
    rng = np.random.default_rng(5)
    w = rng.standard_normal((k, n)).astype(np.float32)
    q = quantize(w, QuantSpec("uint4", "group", group, symmetric=False), "weight")
    assert q.axis == 0 and q.scale.shape == (-(-k // group), n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = kernel(m, k, n, group, "gemv")(x, pack_weights(q.values.astype(np.uint8), q.scale,
                                                       q.zero_point.astype(np.uint8), group))
    assert_close(y, x.astype(np.float64) @ q.dequantize().astype(np.float64))


def test_packed_layout_is_the_documented_one():
    k, n, group = 97, 70, 32
    codes, scale, zero = random_weights(k, n, group, seed=6)
    packed = pack_weights(codes, scale, zero, group)
    groups, width = 4, 2 * TILE
    assert packed["packed"].shape == (2, groups * group // 2, TILE) and packed["packed"].dtype == np.uint8
    assert packed["scale"].shape == (2, groups, TILE) and packed["zero"].shape == (2, groups, TILE)
    assert packed["scale"].dtype == np.float32 and packed["zero"].dtype == np.uint8
    columns = packed["packed"].transpose(1, 0, 2).reshape(-1, width)  # [k pairs, padded N]
    unpacked = np.stack([columns & 15, columns >> 4], axis=1).reshape(-1, width)  # even k in the low nibble
    np.testing.assert_array_equal(unpacked[:k, :n], codes)
    assert not unpacked[k:].any() and not unpacked[:, n:].any()
    for name, value in (("scale", scale), ("zero", zero)):  # [tile, group, column in tile], contiguous per tile
        assert packed[name].flags.c_contiguous
        per_group = packed[name].transpose(1, 0, 2).reshape(groups, width)
        np.testing.assert_array_equal(per_group[:, :n], value)
        assert not per_group[:, n:].any()


@pytest.mark.parametrize("schedule", ["gemv", "gemm"])
def test_each_group_and_column_reads_its_own_scale_and_zero(schedule):
    # One (group, column) at a time carries a nonzero scale, in every tile and group (the last tile
    # ragged, K ragged against the group): a kernel reading the per-tile layout at the wrong tile,
    # group or lane puts that column's result elsewhere or drops it.
    m, k, n, group = 2, 75, 150, 16
    groups = -(-k // group)
    codes, _, zero = random_weights(k, n, group, seed=8)
    x = np.random.default_rng(9).standard_normal((m, k)).astype(np.float32)
    matmul = kernel(m, k, n, group, schedule)
    for j, c in [(0, 0), (groups - 1, n - 1), (1, TILE), (2, TILE + 5), (groups - 1, 2 * TILE + 3), (3, TILE - 1)]:
        scale = np.zeros((groups, n), np.float32)
        scale[j, c] = 1.0
        expected = reference(x, codes, scale, zero, group)
        y = matmul(x, pack_weights(codes, scale, zero, group))
        assert np.abs(expected[:, c]).min() > 0 and not np.delete(y, c, axis=1).any()
        assert_close(y, expected)


def test_bad_inputs_are_refused():
    codes, scale, zero = random_weights(97, 37, 32, seed=7)
    with pytest.raises(ValueError, match="scale and zero"):
        pack_weights(codes, scale[:-1], zero[:-1], 32)
    with pytest.raises(ValueError, match="0..15"):
        pack_weights(codes.astype(np.int16) + 1, scale, zero, 32)
    matmul = kernel(5, 97, 37, 32, "gemv")
    with pytest.raises(ValueError, match="built for"):
        matmul(np.zeros((5, 96), np.float32), pack_weights(codes, scale, zero, 32))
    with pytest.raises(ValueError, match="this kernel needs"):
        matmul.upload(pack_weights(codes[:64], scale[:2], zero[:2], 32))
