"""shift: Outlier Suppression+ channel shifting (and scaling), absorbed by the producer.

Outlier channels are often asymmetric: one channel lives in [20, 40], another in
[-3, 3]. Centring each channel shrinks the range a symmetric quantizer must cover::

    z_j = (max_j + min_j) / 2          x' = x - z   (producer: beta - z, or b_p - z)
    b' = b + z W                        (every sink; a zero bias is created when absent)

``scale=true`` adds OS+ scaling after the shift, ``s_j = max(1, max|x_j - z_j| / t)``,
with the threshold ``t`` searched on calibration rows for the lowest output error of
the region's sinks once quantized under the pipeline's target (int8 per-tensor
activations and per-channel weights without one); ``t = max_j max|x_j - z_j|`` (no
scaling) is always a candidate.

Convolutions take the same shift along their channel axis 1 (`qcompiler.conv_absorb`),
``b' = b + sum_{c,k} W[:, c, k] z_c``, where no ReLU lies on the path and no sink pads its
input (a zero pad of the shifted input would be ``z`` in the original).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from qcompiler.absorb import absorb_affine
from qcompiler.analysis.region_data import producer_channel_max
from qcompiler.analysis.regions import SHIFT, Region
from qcompiler.conv_absorb import absorb_conv_affine
from qcompiler.options import option
from qcompiler.quant.conv_proxy import conv_region_error, conv_region_samples
from qcompiler.quant.proxy import region_error, region_samples
from qcompiler.region_pass import RegionPass
from qcompiler.pass_api import PassContext, PassOutcome
from qcompiler.registry import register


@dataclass
class ShiftOptions:
    scale: bool = option(False, "after shifting, also scale (OS+): thresholds searched per region by quantized error")
    grid: int = option(20, "with scale: thresholds tried")
    rows: int = option(512, "with scale: calibration rows per tensor the search scores on")

    def __post_init__(self) -> None:
        if self.grid < 1 or self.rows < 1:
            raise ValueError("grid and rows must be positive")


def channel_centres(region: Region, stats: dict) -> np.ndarray:
    """``(max + min) / 2`` per producer channel over every sink that reads it (0 where none does)."""
    high = np.full(region.channels, -np.inf)
    low = np.full(region.channels, np.inf)
    for sink in region.sinks:
        s = stats[sink.linear.input.name]
        np.maximum.at(high, sink.channel_map, s.max)
        np.minimum.at(low, sink.channel_map, s.min)
    centre = (high + low) / 2
    return np.where(np.isfinite(centre), centre, 0.0)


@register
class Shift(RegionPass):
    name = "shift"
    summary = "Outlier Suppression+: centre asymmetric activation channels (optionally scale them) into the producer."
    Options = ShiftOptions
    capability = SHIFT

    def searches(self) -> bool:
        return self.options.scale

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        work = self.regions(model, ctx)
        stats = work.stats
        notes: list[str] = []
        shifted, thresholds = [], {}
        with ctx.progress("shift search", len(work.regions) if self.searches() else 0) as advance:
            for region in work.regions:
                centre = channel_centres(region, stats)
                scale = None
                if self.options.scale:
                    reach = producer_channel_max(region, {n: np.maximum(stats[n].max, -stats[n].min) for n in work.names})
                    scale, thresholds[region.name] = self._search(
                        centre, np.abs(reach - np.abs(centre)), region_samples(region, work.rows, ctx.target),
                        region_error)
                absorb_affine(model.graph, region, scale, centre, notes)
                shifted.append(f"{region.name} ({region.kind}, max |z| {np.abs(centre).max():.3g})")
                advance()
        convs = self.conv_regions(model, ctx)
        with ctx.progress("shift search (convolutions)", len(convs.regions) if self.searches() else 0) as advance:
            for region in convs.regions:
                high, low = convs.high(region), convs.low(region)
                centre, scale = (high + low) / 2, None
                if self.options.scale:
                    scale, thresholds[region.name] = self._search(
                        centre, (high - low) / 2, conv_region_samples(region, convs.examples, ctx.target),
                        conv_region_error)
                absorb_conv_affine(model.graph, region, scale, centre, notes, self.name)
                shifted.append(f"{region.name} ({region.kind} -> Conv, max |z| {np.abs(centre).max():.3g})")
                advance()
        return PassOutcome(bool(shifted), {"shifted": shifted, "thresholds": thresholds,
                                           "skipped": {**work.refused(SHIFT), **convs.refused}, "notes": notes})

    def _search(self, centre: np.ndarray, half_range: np.ndarray, samples: list,
                error: Callable[..., float]) -> tuple[np.ndarray | None, float]:
        """OS+ scaling ``max(1, half_range / t)`` with the threshold ``t`` of least quantized error."""
        top = float(half_range.max())
        if top <= 0:
            return None, top
        best_scale, best_t, best_error = None, top, error(samples, shift=centre)
        for t in np.quantile(half_range[half_range > 0], np.linspace(0.5, 1.0, self.options.grid, endpoint=False)):
            scale = np.maximum(1.0, half_range / t)
            candidate = error(samples, scale=scale, shift=centre)
            if candidate < best_error:
                best_scale, best_t, best_error = scale, float(t), candidate
        return best_scale, best_t
