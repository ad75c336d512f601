"""Streaming statistics equal the same statistics computed on all data at once."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.calibration.stats import HISTOGRAM_BINS, TensorStats


def _batches(seed: int, count: int, channels: int):
    rng = np.random.default_rng(seed)
    # growing scale forces the histogram range to double several times
    return [rng.standard_normal((3, 5, channels)).astype(np.float32) * (2.0 ** i) for i in range(count)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(1, 6), channels=st.integers(1, 40))
def test_streamed_equals_all_at_once(seed, count, channels):
    batches = _batches(seed, count, channels)
    stats = TensorStats(channels, with_xtx=True)
    for batch in batches:
        stats.update(batch)
    rows = np.concatenate([b.reshape(-1, channels) for b in batches]).astype(np.float64)
    np.testing.assert_allclose(stats.absmax, np.abs(rows).max(0), rtol=1e-6)
    np.testing.assert_allclose(stats.min, rows.min(0), rtol=1e-6)
    np.testing.assert_allclose(stats.max, rows.max(0), rtol=1e-6)
    np.testing.assert_allclose(stats.mean_abs, np.abs(rows).mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.xtx, rows.T @ rows, rtol=1e-4, atol=1e-3)
    assert stats.count == rows.shape[0]
    assert int(stats.hist_counts.sum()) == rows.size
    flat = rows.ravel()
    centred = flat - flat.mean()
    expected_kurtosis = (centred**4).mean() / (centred**2).mean() ** 2
    assert abs(stats.kurtosis - expected_kurtosis) < 1e-6 * max(1.0, expected_kurtosis) + 1e-3
    width = stats.hist_range / HISTOGRAM_BINS
    magnitudes = np.abs(flat)
    for q in (50.0, 99.0, 99.9):
        value = stats.percentile(q)
        # within one bin of a value that splits the data at q
        assert np.mean(magnitudes <= value + width) >= q / 100 - 1e-9
        assert np.mean(magnitudes < value - width) <= q / 100 + 1e-9


def test_outlier_ratio_finds_the_outlier_channel():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (64, 16)).astype(np.float32)
    x[:, 3] *= 40
    stats = TensorStats(16)
    stats.update(x)
    assert 30 < stats.channel_outlier_ratio < 50
    assert stats.kurtosis > 3


def test_channel_axis_one_reduces_nchw_activations_per_channel():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 6, 5, 4)).astype(np.float32) * np.arange(1, 7).reshape(1, 6, 1, 1)
               for _ in range(3)]
    stats = TensorStats(6, channel_axis=1)
    for batch in batches:
        stats.update(batch)
    every = np.concatenate(batches)
    np.testing.assert_allclose(stats.absmax, np.abs(every).max(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(stats.min, every.min(axis=(0, 2, 3)), rtol=1e-6)
    assert stats.count == 2 * 5 * 4 * 3  # one row per pixel
