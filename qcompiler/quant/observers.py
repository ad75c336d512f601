"""Activation observers: turn calibration statistics into the static range of one tensor.

- ``minmax``: the observed min and max; every calibration value is representable.
- ``percentile``: clip |x| at its q-th percentile (default 99.99) from the histogram, so a
  handful of extreme tokens stop inflating the step for everyone else.
- ``mse``: the clipping threshold ``c`` minimising the squared error over the |x|
  histogram, ``sum_b n_b [ (v_b - c)^2 if v_b > c else (v_b - round_c(v_b))^2 ]``.

The result is ``(lo, hi)``; the spec's symmetry then decides how it becomes a scale.
"""

from __future__ import annotations

import numpy as np

from qcompiler.calibration.stats import HISTOGRAM_BINS, TensorStats
from qcompiler.quant.spec import QuantSpec

DEFAULT_PERCENTILE = 99.99
MSE_CANDIDATES = 100


def observe_range(stats: TensorStats, spec: QuantSpec, percentile: float = DEFAULT_PERCENTILE) -> tuple[float, float]:
    """The static ``(lo, hi)`` range of an activation under ``spec.observer``."""
    lo, hi = float(stats.min.min()), float(stats.max.max())
    absmax = max(abs(lo), abs(hi))
    if spec.observer == "minmax" or absmax == 0.0:
        return lo, hi
    if spec.observer == "percentile":
        threshold = stats.percentile(percentile)
    else:
        threshold = mse_threshold(stats, spec)
    threshold = min(max(threshold, 1e-12), absmax)
    return max(lo, -threshold), min(hi, threshold)


def mse_threshold(stats: TensorStats, spec: QuantSpec) -> float:
    """The clipping threshold of |x| with the least expected quantization error.

    Minifloat grids have a step proportional to magnitude, so clipping never buys them
    precision: for float formats this is the observed maximum.
    """
    observed = float(stats.absmax.max())
    fmt = spec.element
    if fmt.kind == "float":
        return observed
    width = stats.hist_range / HISTOGRAM_BINS
    centres = (np.arange(HISTOGRAM_BINS) + 0.5) * width
    counts = stats.hist_counts.astype(np.float64)
    lo, hi = float(stats.min.min()), float(stats.max.max())
    best, best_error = observed, np.inf
    for threshold in np.linspace(observed / MSE_CANDIDATES, observed, MSE_CANDIDATES):
        if spec.symmetric:
            step = threshold / fmt.qmax
        else:
            step = (min(hi, threshold) - max(lo, -threshold)) / (fmt.qmax - fmt.qmin)
        # Rounding error of each bin centre on the grid itself: with 4-bit steps, small values
        # round to zero and cost their square, which the uniform step^2/12 model misses.
        clipped = np.where(centres > threshold, np.square(centres - threshold),
                           np.square(centres - step * np.round(centres / step)))
        error = float(np.sum(counts * clipped))
        if error < best_error:
            best, best_error = float(threshold), error
    return best
