"""fold-norm: fold LayerNorm/RMSNorm gamma (and beta) into the linears that read the norm.

A norm's affine part is a per-channel scale and shift, exactly what a region's sinks
can absorb; folding it leaves a plain normalization (gamma = 1, beta = 0) whose
output is rotation-friendly, and moves the gamma-driven outlier channels of pre-norm
LLMs into weights::

    LN(x) = n(x) * gamma + beta      W' = diag(gamma) W      b' = b + beta W

Only norms whose output is read by linears alone are folded: in post-norm models
(BERT) the norm output also feeds the residual stream, where gamma must stay.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.absorb import absorb_affine
from qcompiler.analysis.linears import constant_array
from qcompiler.analysis.regions import SHIFT, find_regions
from qcompiler.registry import Pass, PassOutcome, register


@register
class FoldNorm(Pass):
    name = "fold-norm"
    summary = "Fold LayerNorm/RMSNorm gamma and beta into the linears reading them (pre-norm regions)."

    def run(self, model: ir.Model, ctx) -> PassOutcome:
        graph = model.graph
        folded, skipped, notes = [], {}, []
        for region in find_regions(graph).of_kind("layernorm", "rmsnorm"):
            name = region.name
            reason = self._refusal(region)
            if reason:
                skipped[name] = reason
                continue
            producer = region.producer
            gamma = constant_array(producer.inputs[1]).astype(np.float64)
            beta = constant_array(producer.inputs[2]) if len(producer.inputs) > 2 and producer.inputs[2] is not None \
                else None
            absorb_affine(graph, region, gamma, None if beta is None else beta.astype(np.float64), notes)
            folded.append(f"{name} ({region.kind})")
        return PassOutcome(bool(folded), {"folded": folded, "skipped": skipped, "notes": notes})

    @staticmethod
    def _refusal(region) -> str | None:
        if region.foreign:
            return "the norm output is also read outside its linears (post-norm residual or graph output)"
        if region.refused:
            absorbing = {c: r for c, r in region.refused.items() if c != "rotate"}
            if "scale" in absorbing:
                return absorbing["scale"]
        gamma = constant_array(region.producer.inputs[1])
        if np.any(gamma == 0):
            return "gamma has zero entries"
        if np.any(gamma < 0) and SHIFT in region.refused and "ReLU" in region.refused[SHIFT]:
            return "negative gamma does not commute with the ReLU on the path"
        has_beta = len(region.producer.inputs) > 2 and region.producer.inputs[2] is not None
        if has_beta and np.any(constant_array(region.producer.inputs[2])) and SHIFT in region.refused:
            return region.refused[SHIFT]
        return None
