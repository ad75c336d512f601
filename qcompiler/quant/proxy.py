"""The quantization proxy that transform searches minimise: int8, symmetric, round-to-nearest.

Searches such as ``smooth(search=true)`` and ``shift(scale=true)`` pick a transform by
the error it leaves once the region is quantized. Until a target format is wired in,
that error is measured under the common W8A8 deployment: int8 per-tensor activations
and int8 per-output-channel weights, both symmetric with absmax ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def fake_quant(x: np.ndarray, bits: int = 8, axis: int | None = None) -> np.ndarray:
    """Quantize-dequantize ``x`` symmetrically; one scale per tensor, or per slice along ``axis``."""
    qmax = 2 ** (bits - 1) - 1
    if axis is None:
        amax = np.max(np.abs(x)) if x.size else 0.0
    else:
        amax = np.max(np.abs(x), axis=tuple(i for i in range(x.ndim) if i != axis % x.ndim), keepdims=True)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    return np.clip(np.round(x / scale), -qmax - 1, qmax) * scale


def linear_error(x: np.ndarray, weight: np.ndarray, bits: int = 8) -> float:
    """Squared error of ``x W`` with both quantized (``W`` stored ``[C_in, C_out]``, per column)."""
    exact = x @ weight
    quantized = fake_quant(x, bits) @ fake_quant(weight, bits, axis=1)
    return float(np.sum(np.square(quantized - exact, dtype=np.float64)))


@dataclass
class SinkSample:
    """Calibration rows of one sink's input with the sink's weight, for scoring a region transform."""

    x: np.ndarray
    weight: np.ndarray
    channel_map: np.ndarray


def region_error(samples: list[SinkSample], scale: np.ndarray | None = None, shift: np.ndarray | None = None,
                 bits: int = 8) -> float:
    """Quantized output error of every sink once the region reads ``(x - z) / s`` (``W' = diag(s) W``).

    The shift's ``z W`` goes to the bias in float, so it adds no error of its own.
    """
    total = 0.0
    for sample in samples:
        x, weight = sample.x.astype(np.float32), sample.weight.astype(np.float32)
        if shift is not None:
            x = x - shift[sample.channel_map].astype(np.float32)
        if scale is not None:
            x = x / scale[sample.channel_map].astype(np.float32)
            weight = weight * scale[sample.channel_map].astype(np.float32)[:, None]
        total += linear_error(x, weight, bits)
    return total
