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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.absorb import absorb_affine
from qcompiler.analysis.regions import SHIFT, Region, find_regions
from qcompiler.analysis.region_data import producer_channel_max, sink_inputs
from qcompiler.quant.proxy import region_error, region_samples
from qcompiler.registry import Pass, PassOutcome, register


@dataclass
class ShiftOptions:
    scale: bool = False
    grid: int = 20
    rows: int = 512

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
class Shift(Pass):
    name = "shift"
    summary = "Outlier Suppression+: centre asymmetric activation channels (optionally scale them) into the producer."
    Options = ShiftOptions

    def statistics(self, model: ir.Model) -> list[str]:
        return sink_inputs(find_regions(model.graph).able(SHIFT))

    def run(self, model: ir.Model, ctx) -> PassOutcome:
        graph = model.graph
        analysis = find_regions(graph)
        regions = analysis.able(SHIFT)
        names = sink_inputs(regions)
        stats = ctx.statistics(model, names)
        rows = ctx.samples(model, names, self.options.rows) if self.options.scale else {}
        notes: list[str] = []
        shifted, thresholds = [], {}
        for region in regions:
            name = region.name
            centre = channel_centres(region, stats)
            scale = None
            if self.options.scale:
                reach = producer_channel_max(region, {n: np.maximum(stats[n].max, -stats[n].min) for n in names})
                scale, thresholds[name] = self._search(region, centre, np.abs(reach - np.abs(centre)), rows, ctx.target)
            absorb_affine(graph, region, scale, centre, notes)
            shifted.append(f"{name} ({region.kind}, max |z| {np.abs(centre).max():.3g})")
        skipped = {r.name: r.refused[SHIFT] for r in analysis.regions if SHIFT in r.refused}
        return PassOutcome(bool(shifted), {"shifted": shifted, "thresholds": thresholds, "skipped": skipped,
                                           "notes": notes})

    def _search(self, region: Region, centre: np.ndarray, half_range: np.ndarray,
                rows: dict[str, np.ndarray], target) -> tuple[np.ndarray | None, float]:
        """OS+ scaling ``max(1, half_range / t)`` with the threshold ``t`` of least quantized error."""
        samples = region_samples(region, rows, target)
        top = float(half_range.max())
        best_scale, best_t, best_error = None, top, region_error(samples, shift=centre)
        for t in np.quantile(half_range[half_range > 0], np.linspace(0.5, 1.0, self.options.grid, endpoint=False)):
            scale = np.maximum(1.0, half_range / t)
            error = region_error(samples, scale=scale, shift=centre)
            if error < best_error:
                best_scale, best_t, best_error = scale, float(t), error
        return best_scale, best_t
