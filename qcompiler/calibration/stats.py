"""Streaming statistics of one activation tensor, updated batch by batch.

Channels are the last axis (the input features of a linear), or axis 1 for the NCHW
activations a convolution reads (``channel_axis=1``). State is O(C) per tensor
(O(C^2) for ``X^T X``) however many batches stream through:

- per channel: absmax, min, max, mean |x|;
- per tensor: raw moments up to the 4th (mean, std, kurtosis) and a histogram of |x|
  for percentiles. The histogram keeps a fixed bin count over ``[0, R]``; when a batch
  exceeds ``R`` the range doubles and adjacent bins merge pairwise, which is exact, so
  no batch is ever re-read;
- optionally ``X^T X`` (float64), the Hessian proxy GPTQ needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

HISTOGRAM_BINS = 2048


@dataclass
class TensorStats:
    """Accumulated statistics of one tensor (channel axis last, or ``channel_axis``)."""

    channels: int
    with_xtx: bool = False
    channel_axis: int = -1
    count: int = 0  # rows (tokens) seen
    absmax: np.ndarray = field(init=False)
    min: np.ndarray = field(init=False)
    max: np.ndarray = field(init=False)
    abs_sum: np.ndarray = field(init=False)
    moments: np.ndarray = field(init=False)  # sums of x, x^2, x^3, x^4 over all elements
    hist_counts: np.ndarray = field(init=False)
    hist_range: float = 0.0
    xtx: np.ndarray | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        c = self.channels
        self.absmax = np.zeros(c, np.float32)
        self.min = np.full(c, np.inf, np.float32)
        self.max = np.full(c, -np.inf, np.float32)
        self.abs_sum = np.zeros(c, np.float64)
        self.moments = np.zeros(4, np.float64)
        self.hist_counts = np.zeros(HISTOGRAM_BINS, np.int64)
        if self.with_xtx:
            self.xtx = np.zeros((c, c), np.float64)

    # ------------------------------------------------------------------ update
    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, dtype=np.float32)
        if self.channel_axis not in (-1, batch.ndim - 1):
            batch = np.moveaxis(batch, self.channel_axis, -1)
        rows = batch.reshape(-1, self.channels)
        if rows.shape[0] == 0:
            return
        absolute = np.abs(rows)
        np.maximum(self.absmax, absolute.max(axis=0), out=self.absmax)
        np.minimum(self.min, rows.min(axis=0), out=self.min)
        np.maximum(self.max, rows.max(axis=0), out=self.max)
        self.abs_sum += absolute.sum(axis=0, dtype=np.float64)
        flat = rows.astype(np.float64).ravel()
        square = flat * flat
        self.moments += (flat.sum(), square.sum(), (square * flat).sum(), (square * square).sum())
        self._update_histogram(absolute)
        if self.xtx is not None:
            self.xtx += (rows.T @ rows).astype(np.float64)
        self.count += rows.shape[0]

    def _update_histogram(self, absolute: np.ndarray) -> None:
        peak = float(absolute.max())
        if self.hist_range == 0.0:
            self.hist_range = peak if peak > 0 else 1.0
        while peak > self.hist_range:
            merged = self.hist_counts[0::2] + self.hist_counts[1::2]
            self.hist_counts = np.concatenate([merged, np.zeros_like(merged)])
            self.hist_range *= 2.0
        counts, _ = np.histogram(absolute, bins=HISTOGRAM_BINS, range=(0.0, self.hist_range))
        self.hist_counts += counts

    # ------------------------------------------------------------------ results
    @property
    def elements(self) -> int:
        return self.count * self.channels

    @property
    def mean_abs(self) -> np.ndarray:
        return (self.abs_sum / max(self.count, 1)).astype(np.float32)

    @property
    def mean(self) -> float:
        return float(self.moments[0] / max(self.elements, 1))

    @property
    def std(self) -> float:
        n = max(self.elements, 1)
        return float(np.sqrt(max(self.moments[1] / n - (self.moments[0] / n) ** 2, 0.0)))

    @property
    def kurtosis(self) -> float:
        """Pearson kurtosis E[(x-mu)^4] / sigma^4 of all values (3 for a Gaussian)."""
        n = max(self.elements, 1)
        m1, m2, m3, m4 = (self.moments / n).tolist()
        variance = m2 - m1 * m1
        if variance <= 0:
            return 0.0
        central4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1 ** 4
        return float(central4 / variance ** 2)

    @property
    def channel_outlier_ratio(self) -> float:
        """max / median of the per-channel absmax: how far the worst channel sticks out."""
        median = float(np.median(self.absmax))
        return float(self.absmax.max() / median) if median > 0 else float("inf")

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100) of |x| from the histogram (bin-edge interpolated)."""
        total = int(self.hist_counts.sum())
        if total == 0:
            return 0.0
        cumulative = np.cumsum(self.hist_counts)
        target = q / 100.0 * total
        index = int(np.searchsorted(cumulative, target, side="left"))
        index = min(index, HISTOGRAM_BINS - 1)
        before = cumulative[index - 1] if index > 0 else 0
        inside = self.hist_counts[index]
        fraction = (target - before) / inside if inside else 1.0
        width = self.hist_range / HISTOGRAM_BINS
        return float((index + min(max(fraction, 0.0), 1.0)) * width)

    @staticmethod
    def projected_state_bytes(channels: int, with_xtx: bool) -> int:
        """Memory the accumulator of a ``channels``-wide tensor will hold."""
        return channels * 4 * 4 + 32 + HISTOGRAM_BINS * 8 + (channels**2 * 8 if with_xtx else 0)

    def summary(self) -> dict:
        """The JSON-friendly scalars (per-channel arrays are left to callers that want them)."""
        return {
            "channels": self.channels,
            "rows": self.count,
            "absmax": float(self.absmax.max()) if self.count else 0.0,
            "channel_outlier_ratio": self.channel_outlier_ratio if self.count else 0.0,
            "kurtosis": self.kurtosis,
            "p99.9": self.percentile(99.9),
            "xtx": self.xtx is not None,
        }
