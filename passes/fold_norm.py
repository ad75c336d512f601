"""fold-norm: fold LayerNorm/RMSNorm gamma (and beta) into the linears that read the norm.

A norm's affine part is a per-channel scale and shift, exactly what a region's sinks
can absorb; folding it leaves a plain normalization (gamma = 1, beta = 0) whose
output is rotation-friendly, and moves the gamma-driven outlier channels of pre-norm
LLMs into weights::

    LN(x) = n(x) * gamma + beta      W' = diag(gamma) W      b' = b + beta W

Only norms whose output is read by linears alone are folded: in post-norm models
(BERT) the norm output also feeds the residual stream, where gamma must stay.

``rmsnorm=true`` then turns the LayerNorms of a pre-norm residual stream into RMSNorm
(SliceGPT): every writer of the stream drops its mean over channels, ``W' = W (I -
11^T/n)``, so ``LayerNorm(x) = RMSNorm(x)`` with the same epsilon and gamma. It is an
option, off by default, because it rewrites every writer of the stream and takes away
the beta that shift absorbs into; rotate does the same conversion by itself when it
rotates a LayerNorm stream (it cannot rotate one without it), so the option is for
using the RMSNorm form without a rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.absorb import absorb_affine
from qcompiler.analysis.linears import constant_array
from qcompiler.analysis.regions import SHIFT, find_regions
from qcompiler.analysis.residual import CENTER, find_streams
from qcompiler.options import option
from qcompiler.pass_api import Pass, PassContext, PassOutcome
from qcompiler.registry import register
from qcompiler.stream_rewrite import center_stream


@dataclass
class FoldNormOptions:
    rmsnorm: bool = option(False, "also turn LayerNorms whose input is centred into RMSNorm")


@register
class FoldNorm(Pass):
    name = "fold-norm"
    summary = "Fold LayerNorm/RMSNorm gamma and beta into the linears reading them (pre-norm regions)."
    Options = FoldNormOptions

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
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
        details = {"folded": folded, "skipped": skipped, "notes": notes}
        if self.options.rmsnorm:
            details["rmsnorm"], details["rmsnorm_skipped"] = self._to_rmsnorm(graph, notes)
        return PassOutcome(bool(folded or details.get("rmsnorm")), details)

    @staticmethod
    def _to_rmsnorm(graph: ir.Graph, notes: list[str]) -> tuple[list[str], dict[str, str]]:
        """Center every stream whose readers are all LayerNorms; the norms converted, and why others were not."""
        converted, skipped = [], {}
        for stream in find_streams(graph):
            if stream.can(CENTER):
                converted += center_stream(graph, stream, notes)
            else:
                skipped[stream.name] = stream.refused[CENTER]
        return converted, skipped

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
