"""Activation observers on streamed statistics."""

from __future__ import annotations

import numpy as np

from qcompiler.calibration.stats import TensorStats
from qcompiler.quant.observers import observe_range
from qcompiler.quant.spec import QuantSpec, quantize


def _stats(values: np.ndarray) -> TensorStats:
    stats = TensorStats(values.shape[-1])
    for chunk in np.array_split(values, 4):
        stats.update(chunk)
    return stats


def _quantized_error(values, spec, bounds):
    q = quantize(values, spec, "activation", bounds=tuple(np.float32(b) for b in bounds))
    return float(np.mean(np.square(q.dequantize() - values)))


def test_minmax_covers_everything_and_clipping_observers_shrink_heavy_tails():
    rng = np.random.default_rng(0)
    values = rng.standard_t(2, (4000, 16)).astype(np.float32)  # heavy tails, like real activations
    stats = _stats(values)
    spec = QuantSpec("int4")
    lo, hi = observe_range(stats, QuantSpec("int4", observer="minmax"))
    assert lo == values.min() and hi == values.max()
    percentile = observe_range(stats, QuantSpec("int4", observer="percentile"), 99.0)
    assert percentile[1] < 0.2 * hi
    mse = observe_range(stats, QuantSpec("int4", observer="mse"))
    assert mse[1] < 0.5 * hi
    brute_force = min(_quantized_error(values, spec, (-t, t)) for t in np.linspace(1, hi, 200))
    assert _quantized_error(values, spec, mse) < 1.05 * brute_force < 0.8 * _quantized_error(values, spec, (lo, hi))


def test_mse_keeps_the_range_of_float_formats():
    values = np.random.default_rng(1).standard_normal((1000, 8)).astype(np.float32)
    stats = _stats(values)
    assert observe_range(stats, QuantSpec("fp8-e4m3", observer="mse")) == (values.min(), values.max())


def test_asymmetric_ranges_keep_their_sign():
    values = np.abs(np.random.default_rng(2).standard_normal((1000, 8))).astype(np.float32)
    lo, hi = observe_range(_stats(values), QuantSpec("uint8", symmetric=False, observer="percentile"), 99.0)
    assert lo >= 0 and 0 < hi < values.max()
