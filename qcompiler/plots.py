"""Figures for the artifact report: what the transforms did to outlier channels, and per-layer error.

`ChannelTrace` is a pass-manager observer: after normalization and after every transform
pass it records each linear input's per-channel absmax on the calibration data (cached
statistics, so a pass that did not touch a tensor costs nothing). `write_figures` then
draws, for the layers whose inputs had the worst max/median channel ratio, the channel
profile at every stage (channels.png), that ratio for every layer after every stage
(outliers.png: what each transform bought, layer by layer), and the per-layer weight
SQNR the quantize pass recorded, worst first (weight_sqnr.png: where to spend bits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.linears import find_linears

NORMALIZE_PASSES = {"convert-opset", "simplify", "fuse-norms", "fuse-gelu", "canonical-linear"}
WORST_LAYERS = 3


@dataclass
class ChannelTrace:
    """Per stage (``normalized``, then each transform pass), per layer: per-channel absmax of its input."""

    passes: list
    stages: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def __call__(self, pass_, model: ir.Model, ctx) -> None:
        if ctx.engine is None or not pass_.preserves_function:
            return
        if pass_.name in NORMALIZE_PASSES:
            following = self.passes[self.passes.index(pass_) + 1:]
            if following and following[0].name in NORMALIZE_PASSES:
                return  # only the end of normalization is a stage
        label = "normalized" if pass_.name in NORMALIZE_PASSES else pass_.name
        if label == pass_.name and label in self.stages:
            label = f"{label} ({len(self.stages)})"
        linears = find_linears(model.graph)
        names = list(dict.fromkeys(linear.input.name for linear in linears))
        stats = ctx.engine.collect(model, names)
        self.stages[label] = {linear.layer: stats[linear.input.name].absmax.copy() for linear in linears}


def write_figures(folder: Path, trace: ChannelTrace | None, weight_sqnr: dict[str, float]) -> list[str]:
    """Draw the figures into ``folder``; returns their file names (none without data)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    first = trace.stages.get("normalized", {}) if trace is not None and len(trace.stages) > 1 else {}
    ratio = {layer: float(a.max() / max(np.median(a), 1e-12)) for layer, a in first.items()}
    worst = sorted(ratio, key=ratio.get, reverse=True)[:WORST_LAYERS]
    if worst:  # a model without linears (a CNN) has no channel profile to draw
        figure, axes = plt.subplots(len(worst), 1, figsize=(10, 2.8 * len(worst)), squeeze=False)
        for axis, layer in zip(axes[:, 0], worst):
            for stage, profiles in trace.stages.items():
                if layer in profiles:
                    values = profiles[layer]
                    axis.plot(values, linewidth=0.8,
                              label=f"{stage} (max/median {values.max() / max(np.median(values), 1e-12):.1f})")
            axis.set_yscale("log")
            axis.set_title(f"input of {layer}: per-channel max |x|", fontsize=9)
            axis.set_xlabel("channel", fontsize=8)
            axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(folder / "channels.png", dpi=110)
        plt.close(figure)
        written.append("channels.png")
    if ratio and len(trace.stages) > 1:
        written.append(_outlier_ratios(plt, folder, trace, ratio))
    if weight_sqnr:
        written.append(_weight_sqnr(plt, folder, weight_sqnr))
    return written


def _outlier_ratios(plt, folder: Path, trace: ChannelTrace, first: dict[str, float]) -> str:
    """Every layer's input max/median channel ratio after each stage, layers worst first: what each transform bought."""
    layers = sorted(first, key=first.get, reverse=True)
    figure, axis = plt.subplots(figsize=(10, 3.6))
    for stage, profiles in trace.stages.items():
        values = [float(profiles[l].max() / max(np.median(profiles[l]), 1e-12)) if l in profiles else np.nan
                  for l in layers]
        axis.plot(range(len(layers)), values, marker="o", markersize=2.5, linewidth=0.9, label=stage)
    axis.set_yscale("log")
    axis.set_xlabel("linear input, worst first after normalization", fontsize=8)
    axis.set_ylabel("max / median channel |x|", fontsize=8)
    axis.set_title("outlier ratio of every linear input after each transform (lower quantizes better)", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "outliers.png", dpi=110)
    plt.close(figure)
    return "outliers.png"


def _weight_sqnr(plt, folder: Path, weight_sqnr: dict[str, float]) -> str:
    """Per-layer weight SQNR, worst first, labels in full: the layers to keep at higher precision are at the top."""
    layers = sorted(weight_sqnr, key=weight_sqnr.get)
    label_inches = 0.065 * max(len(layer) for layer in layers)
    figure, axis = plt.subplots(figsize=(6 + label_inches, 0.2 * len(layers) + 1.2))
    axis.barh(range(len(layers)), [weight_sqnr[layer] for layer in layers], color="tab:blue")
    axis.set_yticks(range(len(layers)), layers, fontsize=6)
    axis.invert_yaxis()
    axis.set_xlabel("weight SQNR (dB), worst first", fontsize=8)
    figure.tight_layout()
    figure.savefig(folder / "weight_sqnr.png", dpi=110)
    plt.close(figure)
    return "weight_sqnr.png"
