"""The base of passes that transform each region from statistics of its sinks' inputs (smooth, shift).

Such a pass names the capability it needs (`qcompiler.analysis.regions.SCALE`, ``SHIFT``);
the base finds the regions that have it, asks the calibration engine for the sinks'
input statistics once (declared up front in `RegionPass.statistics`, so one run serves
the pipeline), draws calibration rows when the pass searches, and lists the regions
that were refused with their reasons, so every region pass reports alike. Regions whose
sinks are convolutions (`qcompiler.analysis.conv_regions`) come with statistics over
their channel axis 1 and, for searches, whole calibration samples (`ConvWork`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.conv_regions import ConvRegion, find_conv_regions
from qcompiler.analysis.region_data import sink_inputs
from qcompiler.analysis.regions import Region, RegionAnalysis, find_regions
from qcompiler.calibration.stats import TensorStats
from qcompiler.pass_api import Pass, PassContext


@dataclass
class RegionWork:
    """The regions a pass may transform, with the calibration data about their sinks' inputs."""

    analysis: RegionAnalysis
    regions: list[Region]
    names: list[str]  # the sinks' input tensors
    stats: dict[str, TensorStats]
    rows: dict[str, np.ndarray]  # token rows of those tensors, when the pass searches

    def refused(self, capability: str) -> dict[str, str]:
        """Region name -> why it cannot take the transform."""
        return {r.name: r.refused[capability] for r in self.analysis.regions if capability in r.refused}


# Whole calibration samples a search over a convolution region scores on (a pixel's output needs its neighbours).
CONV_SEARCH_SAMPLES = 8


@dataclass
class ConvWork:
    """The convolution regions a pass may transform, with channel-axis-1 statistics of their sinks' inputs."""

    regions: list[ConvRegion]
    refused: dict[str, str]
    stats: dict[str, TensorStats]
    examples: dict[str, np.ndarray]  # whole calibration samples of the sinks' inputs, when the pass searches

    def absmax(self, region: ConvRegion) -> np.ndarray:
        return np.max([self.stats[s.input.name].absmax for s in region.sinks], axis=0)

    def high(self, region: ConvRegion) -> np.ndarray:
        return np.max([self.stats[s.input.name].max for s in region.sinks], axis=0)

    def low(self, region: ConvRegion) -> np.ndarray:
        return np.min([self.stats[s.input.name].min for s in region.sinks], axis=0)


class RegionPass(Pass):
    """A pass applied region by region; subclasses set ``capability`` and say whether they search."""

    capability: ClassVar[str]

    def searches(self) -> bool:
        """Whether the pass scores candidates on calibration rows (then `RegionWork.rows` is filled)."""
        return False

    def statistics(self, model: ir.Model) -> list[str]:
        return sink_inputs(find_regions(model.graph).able(self.capability))

    def regions(self, model: ir.Model, ctx: PassContext) -> RegionWork:
        analysis = find_regions(model.graph)
        regions = analysis.able(self.capability)
        names = sink_inputs(regions)
        stats = ctx.statistics(model, names)
        rows = ctx.samples(model, names, self.options.rows) if self.searches() else {}
        return RegionWork(analysis, regions, names, stats, rows)

    def conv_regions(self, model: ir.Model, ctx: PassContext) -> ConvWork:
        found = find_conv_regions(model.graph)
        regions = [r for r in found if r.can(self.capability)]
        names = list(dict.fromkeys(s.input.name for r in regions for s in r.sinks))
        stats = ctx.statistics(model, names, channels_first=names) if names else {}
        examples = ctx.examples(model, names, CONV_SEARCH_SAMPLES) if names and self.searches() else {}
        refused = {r.name: r.refused[self.capability] for r in found if self.capability in r.refused}
        return ConvWork(regions, refused, stats, examples)
