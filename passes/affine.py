"""affine: FlatQuant's learned affine transforms, one per linear group, online before the linears.

A rotation flattens outliers but is fixed; FlatQuant learns, per group of linears reading
one activation, an invertible ``T = P1 kron P2`` (``C = n1 n2``) and a per-channel scale
``s`` that make the quantized product closest to the float one (`qcompiler.quant.affine_fit`)::

    x' = (x / s) T        W' = T^-1 diag(s) W        (x' W' = x W, exactly)

``T`` runs online as a ``qcompiler.Hadamard(x, P1, P2)`` node (the same Kronecker
product node as rotate's online Hadamards: ``P1^T X P2`` per row, ``n1 + n2``
multiply-adds per element, lowered by both backends); ``T^-1`` and ``s`` fold into the
linears' weights, ``1 / s`` into the producer where the region absorbs a scale (norm
gamma/beta, a linear producer's columns); elsewhere only ``T`` is learned. The fit
starts from Hadamard factors and scores against the quantization target of the pipeline
(the preset that follows; int8 W8A8 without one). An activation already behind an online
Hadamard (``rotate`` before) has its factors refined in place: ``(A kron B)(Q1 kron Q2)
= (A Q1) kron (B Q2)``, so no second node is added. A group whose best transform
quantizes worse than no transform keeps none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.absorb import SCALE_LIMITS, absorb_affine, rewrite_constant
from qcompiler.analysis.linears import Linear, constant_array, find_linears
from qcompiler.analysis.regions import ONLINE_ROTATION, Region, find_regions
from qcompiler.graph import add_initializer
from qcompiler.hadamard import orthogonal_matrix
from qcompiler.online_rotation import insert_kronecker, rotate_last_axis
from qcompiler.options import option
from qcompiler.pass_api import Pass, PassContext, PassOutcome
from qcompiler.quant.affine_fit import AffineFit, fit_affine
from qcompiler.quant.proxy import PROXY_SCHEME
from qcompiler.registry import register


@dataclass
class AffineOptions:
    steps: int = option(100, "Adam steps per linear group (each over all the calibration rows taken)")
    lr: float = option(5e-3, "Adam learning rate of the factors and the scale")
    rows: int = option(1024, "calibration rows (tokens) per activation the transforms learn on")
    scale: bool = option(True, "also learn a per-channel scale where the producer absorbs one")

    def __post_init__(self) -> None:
        if self.steps < 0 or self.rows < 1 or not self.lr > 0:
            raise ValueError("steps must be >= 0, rows >= 1 and lr > 0")


@dataclass
class _Group:
    """The linears reading one activation, in the region that made it."""

    region: Region
    value: ir.Value
    linears: list[Linear]

    @property
    def channels(self) -> int:
        return self.linears[0].in_features


def kronecker_sizes(channels: int) -> tuple[int, int] | None:
    """``(n1, n2)``, ``n1 <= n2``, the most balanced factor pair of ``channels`` (None when it is prime)."""
    n1 = max((d for d in range(2, int(channels**0.5) + 1) if channels % d == 0), default=None)
    return None if n1 is None else (n1, channels // n1)


@register
class Affine(Pass):
    name = "affine"
    summary = "FlatQuant: learn an invertible Kronecker transform (and scale) per linear group against the target."
    Options = AffineOptions

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        graph = model.graph
        groups, skipped = self._groups(graph)
        rows = ctx.samples(model, [g.value.name for g in groups], self.options.rows) if groups else {}
        scheme = ctx.target or PROXY_SCHEME
        notes: list[str] = []
        transformed: dict[str, dict] = {}
        online_macs = 0
        with ctx.progress("affine fit", len(groups)) as advance:
            for group in groups:
                fit, factors = self._fit(group, rows[group.value.name], scheme, skipped)
                advance()
                if fit is None:
                    continue
                if fit.loss >= fit.identity_loss:
                    skipped[group.value.name] = (f"no transform quantizes better ({fit.identity_loss:.3g}) than the "
                                                 f"best learned one ({fit.loss:.3g})")
                    continue
                self._deploy(model, group, fit, notes)
                online_macs += group.channels * sum(factors)
                transformed[group.value.name] = {
                    "channels": group.channels, "factors": f"{factors[0]}x{factors[1]}",
                    "scale": fit.scale is not None, "refined": group.region.kind == ONLINE_ROTATION,
                    "loss": {"none": fit.identity_loss, "start": fit.start_loss, "learned": fit.loss}}
        linear_macs = sum(lin.in_features * lin.out_features for lin in find_linears(graph))
        share = online_macs / linear_macs if linear_macs else 0.0
        return PassOutcome(bool(transformed), {"transformed": transformed, "skipped": skipped,
                                               "online_macs_share": share, "target": scheme.describe(),
                                               "notes": notes})

    def _groups(self, graph: ir.Graph) -> tuple[list[_Group], dict[str, str]]:
        groups, skipped = [], {}
        for region in find_regions(graph).regions:
            for value in dict.fromkeys(s.linear.input for s in region.sinks):
                group = _Group(region, value, [s.linear for s in region.sinks if s.linear.input is value])
                if region.kind == ONLINE_ROTATION and value is not region.online.hadamard.outputs[0]:
                    skipped[value.name] = "behind an online Hadamard with a scale or shift after it"
                elif kronecker_sizes(group.channels) is None:
                    skipped[value.name] = f"{group.channels} channels are prime: no Kronecker factors"
                elif any(len(lin.weight.uses()) > 1 for lin in group.linears):
                    skipped[value.name] = "a weight is shared with other readers"
                else:
                    groups.append(group)
        return groups, skipped

    def _fit(self, group: _Group, rows: np.ndarray, scheme, skipped: dict[str, str]
             ) -> tuple[AffineFit | None, tuple[int, int]]:
        region = group.region
        if region.kind == ONLINE_ROTATION:  # refine the existing factors, starting from no change
            a, b = (constant_array(v) for v in region.online.hadamard.inputs[1:])
            start = np.eye(len(a)), np.eye(len(b))
        else:
            n1, n2 = kronecker_sizes(group.channels)
            start = orthogonal_matrix(n1), orthogonal_matrix(n2)
        learn_scale = self.options.scale and group.region.absorbs_scale_of(group.value)
        weights = [constant_array(lin.weight) for lin in group.linears]
        try:
            fit = fit_affine(rows, weights, scheme, *start, learn_scale, self.options.steps, self.options.lr)
        except ValueError as error:  # a group size the channels do not split into
            skipped[group.value.name] = str(error)
            return None, (0, 0)
        if fit.scale is not None:
            fit.scale = np.clip(fit.scale, *SCALE_LIMITS)
        return fit, (len(start[0]), len(start[1]))

    def _deploy(self, model: ir.Model, group: _Group, fit: AffineFit, notes: list[str]) -> None:
        graph = model.graph
        if fit.scale is not None:
            absorb_affine(graph, group.region, fit.scale, None, notes)  # x / s; sinks' rows times s
        dtype = group.value.dtype.numpy() if group.value.dtype is not None else np.float32
        if group.region.kind == ONLINE_ROTATION:
            node = group.region.online.hadamard
            a, b = (constant_array(v).astype(np.float64) for v in node.inputs[1:])
            node.replace_input_with(1, add_initializer(graph, f"{group.value.name}_affine_p1", (a @ fit.p1).astype(dtype)))
            node.replace_input_with(2, add_initializer(graph, f"{group.value.name}_affine_p2", (b @ fit.p2).astype(dtype)))
            transformed = group.value
        else:
            p1 = add_initializer(graph, f"{group.value.name}_affine_p1", fit.p1.astype(dtype))
            p2 = add_initializer(graph, f"{group.value.name}_affine_p2", fit.p2.astype(dtype))
            transformed = insert_kronecker(model, group.value, p1, p2, "affine", "affine").outputs[0]
        inverse1, inverse2 = np.linalg.inv(fit.p1).T, np.linalg.inv(fit.p2).T
        for linear in group.linears:
            if transformed is not group.value:
                linear.matmul.replace_input_with(0, transformed)
            # T^-1 W = (W^T T^-T)^T, and T^-T = P1^-T kron P2^-T.
            rewrite_constant(graph, linear.matmul, 1, lambda w: rotate_last_axis(w.T, inverse1, inverse2).T, notes)
