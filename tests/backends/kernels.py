"""Inputs and numpy references shared by the tests of the TVM integer kernels (int8 and W4A8).

Both kernels quantize float activations to int8 inside; their tests feed rows built to
sit on rounding ties and compare with the same numpy quantizer, so the two agree on what
"correct" means. Not a test module: pytest collects nothing here.
"""

from __future__ import annotations

import numpy as np


def activations(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    """Float rows whose per-token steps are powers of two, so some values sit exactly on rounding ties."""
    x = rng.standard_normal((m, k)).astype(np.float32)
    step = np.float32(2.0 ** -5)
    x[:, 0] = 127 * step  # max |x| of every row: its step is exactly 2^-5
    x[:, 1:9] = (np.arange(-4, 4) + 0.5) * step  # ties: numpy rounds half to even
    x[:, 1:] = np.clip(x[:, 1:], -127 * step, 127 * step)
    return x


def quantized(x: np.ndarray, static: tuple[float, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """numpy's int8 codes minus their zero point, and the row scales: per token, or one static quantizer."""
    if static is None:
        step = np.maximum(np.abs(x).max(axis=1) / 127, 1e-30).astype(np.float32)
        return np.clip(np.round(x / step[:, None]), -128, 127), step
    scale, zero = np.float32(static[0]), static[1]
    return np.clip(np.round(x / scale) + zero, -128, 127) - zero, np.full(len(x), scale, np.float32)
