"""smooth: SmoothQuant scale migration, one scale per region, absorbed by the producer.

Activation outlier channels make per-tensor activation scales coarse; weights are easy.
Dividing channel ``j`` of the activation by ``s_j`` and multiplying row ``j`` of every
sink's weight by it moves difficulty from activations to weights without changing
``x W``::

    s_j = max|x_j|^alpha / max|W_j,:|^(1 - alpha)      (max over every sink of the region)
    x' = x / s  (producer: gamma/s, beta/s, or W_p/s, b_p/s)     W' = diag(s) W

``search=true`` picks alpha per region AWQ-style: on calibration rows, the alpha of the
grid (and no smoothing at all) with the smallest output error of the region's sinks once
quantized under the pipeline's target (the preset of the quantize pass that follows;
without one, int8 per-tensor activations and int8 per-channel weights).

Convolutions take the same scale along their channel axis 1 (`qcompiler.conv_absorb`):
``s_c`` from the absmax of input channel ``c`` and the largest kernel weight reading it,
absorbed by the producing Conv or BatchNormalization, searched on whole calibration
samples (`qcompiler.quant.conv_proxy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from qcompiler.absorb import SCALE_LIMITS, absorb_affine
from qcompiler.analysis.conv_regions import kernel_input_max
from qcompiler.analysis.region_data import producer_channel_max, weight_row_max
from qcompiler.analysis.regions import SCALE
from qcompiler.conv_absorb import absorb_conv_affine
from qcompiler.options import option
from qcompiler.quant.conv_proxy import conv_region_error, conv_region_samples
from qcompiler.quant.proxy import region_error, region_samples
from qcompiler.region_pass import RegionPass
from qcompiler.pass_api import PassContext, PassOutcome
from qcompiler.registry import register


@dataclass
class SmoothOptions:
    alpha: float = option(0.5, "migration strength: s = max|x|^alpha / max|W|^(1-alpha), per channel")
    search: bool = option(False, "choose alpha per region (or no smoothing) by the quantized error of its sinks on "
                                 "calibration rows (seconds per region)")
    grid: int = option(20, "with search: alphas tried in [0, 1]")
    rows: int = option(512, "with search: calibration rows per tensor the search scores on")

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], not {self.alpha}")
        if self.grid < 1 or self.rows < 1:
            raise ValueError("grid and rows must be positive")


def smoothing_scale(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's ``s = a^alpha / w^(1-alpha)``; 1 where either side is zero."""
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = act_max**alpha / weight_max ** (1.0 - alpha)
    scale = np.where((act_max > 0) & (weight_max > 0) & np.isfinite(scale), scale, 1.0)
    return np.clip(scale, *SCALE_LIMITS)


@register
class Smooth(RegionPass):
    name = "smooth"
    summary = "SmoothQuant: migrate activation outliers into weights with one per-channel scale per region."
    Options = SmoothOptions
    capability = SCALE

    def searches(self) -> bool:
        return self.options.search

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        work = self.regions(model, ctx)
        notes: list[str] = []
        smoothed, chosen = [], {}
        with ctx.progress("smooth search", len(work.regions) if self.searches() else 0) as advance:
            for region in work.regions:
                act_max = producer_channel_max(region, {n: work.stats[n].absmax for n in work.names})
                weight_max = weight_row_max(region)
                alpha = self._alpha(act_max, weight_max, lambda: region_samples(region, work.rows, ctx.target),
                                    region_error)
                chosen[region.name] = alpha
                advance()
                if alpha is None:
                    continue
                absorb_affine(model.graph, region, smoothing_scale(act_max, weight_max, alpha), None, notes)
                smoothed.append(f"{region.name} ({region.kind}, alpha={alpha:.2f})")
        convs = self.conv_regions(model, ctx)
        with ctx.progress("smooth search (convolutions)", len(convs.regions) if self.searches() else 0) as advance:
            for region in convs.regions:
                act_max, weight_max = convs.absmax(region), kernel_input_max(region)
                alpha = self._alpha(act_max, weight_max,
                                    lambda: conv_region_samples(region, convs.examples, ctx.target), conv_region_error)
                chosen[region.name] = alpha
                advance()
                if alpha is None:
                    continue
                absorb_conv_affine(model.graph, region, smoothing_scale(act_max, weight_max, alpha), None, notes,
                                   self.name)
                smoothed.append(f"{region.name} ({region.kind} -> Conv, alpha={alpha:.2f})")
        return PassOutcome(bool(smoothed), {"smoothed": smoothed, "skipped": {**work.refused(SCALE), **convs.refused},
                                            "alpha": chosen, "notes": notes})

    def _alpha(self, act_max: np.ndarray, weight_max: np.ndarray, samples: Callable[[], list],
               error: Callable[..., float]) -> float | None:
        """The option's alpha, or with search the grid alpha of least quantized error (None: not smoothing is best)."""
        if not self.options.search:
            return self.options.alpha
        drawn = samples()
        best_alpha, best_error = None, error(drawn)
        for alpha in np.linspace(0.0, 1.0, self.options.grid + 1):
            candidate = error(drawn, smoothing_scale(act_max, weight_max, float(alpha)))
            if candidate < best_error:
                best_alpha, best_error = float(alpha), candidate
        return best_alpha
