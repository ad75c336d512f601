"""The error that transform searches minimise: a region's sink outputs once quantized.

Searches such as ``smooth(search=true)``, ``shift(scale=true)`` and AWQ's scale search
pick a transform by the error it leaves once the region is quantized. Each sink is scored
under the scheme it will be deployed with: the pipeline's quantization target when one
follows in the pipeline, else the common W8A8 deployment (int8 per-tensor activations,
int8 per-output-channel weights, both symmetric with absmax ranges). Activation ranges
come from the sample itself, as a min-max observer would set them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.analysis.linears import constant_array
from qcompiler.analysis.regions import Region
from qcompiler.quant.presets import Scheme
from qcompiler.quant.spec import QuantSpec, fake_quant

PROXY_SCHEME = Scheme(QuantSpec("int8", "channel"), QuantSpec("int8", "tensor"))


def linear_error(x: np.ndarray, weight: np.ndarray, scheme: Scheme = PROXY_SCHEME) -> float:
    """Squared error of ``x W`` once both are quantized under ``scheme`` (``W`` stored ``[C_in, C_out]``)."""
    exact = x @ weight
    x_q = fake_quant(x, scheme.activation, "activation") if scheme.activation is not None else x
    quantized = x_q @ fake_quant(weight, scheme.weight, "weight")
    return float(np.sum(np.square(quantized - exact, dtype=np.float64)))


@dataclass
class SinkSample:
    """Calibration rows of one sink's input with the sink's weight, for scoring a region transform."""

    x: np.ndarray
    weight: np.ndarray
    channel_map: np.ndarray
    scheme: Scheme = PROXY_SCHEME


def region_error(samples: list[SinkSample], scale: np.ndarray | None = None, shift: np.ndarray | None = None) -> float:
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
        total += linear_error(x, weight, sample.scheme)
    return total


def region_samples(region: Region, rows: dict[str, np.ndarray], target: Scheme | None = None) -> list[SinkSample]:
    """Each sink's calibration rows and weight, scored under ``target`` (else the int8 proxy)."""
    return [SinkSample(rows[s.linear.input.name], constant_array(s.linear.weight), s.channel_map, target or PROXY_SCHEME)
            for s in region.sinks]
