"""AWQ's activation-aware scale search, on regions rather than on named layers.

AWQ protects the weight rows that meet large activations by scaling them up before
quantization and the activations down by the same factor, absorbed by the producer:

    s = mean|x|^alpha / sqrt(max * min)      alpha = argmin sum_sinks ||Q(x / s) Q(diag(s) W) - x W||^2

It is smooth's search with AWQ's statistic (mean |x| instead of max |x| against max |W|)
and the deployment scheme of each sink, so it shares smooth's region machinery; the
clipping half of AWQ is `qcompiler.quant.weights.clip_search` with the output error.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.absorb import SCALE_LIMITS, absorb_affine
from qcompiler.analysis.linears import constant_array
from qcompiler.analysis.region_data import producer_channel_max, sink_inputs
from qcompiler.analysis.regions import SCALE, find_regions
from qcompiler.quant.presets import Scheme
from qcompiler.quant.proxy import SinkSample, region_error


def awq_scale(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """``mean|x|^alpha``, normalised so its geometric middle is 1 (AWQ's normalisation)."""
    base = np.maximum(mean_abs, 1e-8) ** alpha
    scale = base / np.sqrt(base.max() * base.min())
    return np.clip(scale, *SCALE_LIMITS)


def search_and_absorb(model: ir.Model, ctx, schemes: dict[int, Scheme], grid: int, rows: int) -> dict:
    """Scale every scalable region whose sinks are all quantized; returns the chosen alphas and notes."""
    graph = model.graph
    analysis = find_regions(graph)
    regions = [r for r in analysis.able(SCALE) if all(id(s.linear.matmul) in schemes for s in r.sinks)]
    names = sink_inputs(regions)
    if not names:
        return {"scaled": {}, "notes": []}
    stats = ctx.statistics(model, names)
    samples_by_name = ctx.samples(model, names, rows)
    notes: list[str] = []
    chosen: dict[str, float] = {}
    with ctx.progress("AWQ search", len(regions)) as advance:
        for region in regions:
            mean_abs = producer_channel_max(region, {n: stats[n].mean_abs for n in names})
            samples = [SinkSample(samples_by_name[s.linear.input.name], constant_array(s.linear.weight), s.channel_map,
                                  schemes[id(s.linear.matmul)]) for s in region.sinks]
            best_alpha, best_error = 0.0, region_error(samples)
            for alpha in np.linspace(0.0, 1.0, grid + 1)[1:]:
                error = region_error(samples, awq_scale(mean_abs, float(alpha)))
                if error < best_error:
                    best_alpha, best_error = float(alpha), error
            chosen[region.name] = best_alpha
            if best_alpha > 0:
                absorb_affine(graph, region, awq_scale(mean_abs, best_alpha), None, notes)
            advance()
    return {"scaled": chosen, "notes": notes}
