"""rotate: orthogonal rotations of regions, absorbed offline where the algebra allows, online elsewhere.

A (normalized) Hadamard ``Q`` spreads an outlier channel over all channels, so per-tensor
and per-token scales stop being dominated by it; ``Q`` is orthogonal, so::

    x' = x Q        W' = Q^T W        (x' W' = x W)

Offline, first the residual stream of a pre-norm model (QuaRot): every writer (embedding
tables, o_proj/down_proj/fc2, patch embeddings) takes ``E Q``, ``W Q``, ``b Q``; norms
with a folded gamma commute (``RMSNorm(x Q) = RMSNorm(x) Q``) and their linears take
``Q^T W``. A stream read by LayerNorms is first made zero-mean so they become RMSNorms
(`qcompiler.stream_rewrite.center_stream`; done here because the rotation needs it and it is
exact; ``fold-norm(rmsnorm=true)`` offers it alone). A stream is rotated whole or not at
all (`qcompiler.analysis.residual` says why not: post-norm, unfolded gamma, ...).
Then per region: a linear producer emits ``x Q`` with ``W_p' = W_p Q, b_p' = b_p Q``;
through attention, v_proj absorbs one head-sized ``Q_D`` per head (``softmax(.) V`` is
linear in ``V``). Online: a ``qcompiler.Hadamard`` node rotates the activation in front
of the sinks (norm outputs of models whose stream cannot be rotated, gated products,
GELU outputs), with ``Q^T`` folded into the sinks; a region already behind such a node
(a second rotate) is left as it is. Sizes ``2^k m`` use known Hadamard
matrices of order ``m``; see `qcompiler.hadamard` for what is covered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.absorb import mark_output_transformed, rewrite_constant
from qcompiler.analysis.regions import ONLINE_ROTATION, ROTATE, Region, find_regions
from qcompiler.analysis.residual import find_streams
from qcompiler.hadamard import orthogonal_matrix, rotation_plan
from qcompiler.online_rotation import factor_pair, insert_hadamard, rotate_last_axis
from qcompiler.options import option
from qcompiler.pass_api import Pass, PassContext, PassOutcome
from qcompiler.registry import register
from qcompiler.stream_rewrite import UNROTATE, center_stream, rotate_stream


NORM_KINDS = ("layernorm", "rmsnorm")  # regions whose producer is a norm the stream rotation did not take


@dataclass
class RotateOptions:
    kind: Literal["hadamard", "random"] = option("hadamard", "the rotation: hadamard (QuaRot) or random orthogonal")
    seed: int = option(0, "seed of the random signs and of kind=random")
    mode: Literal["auto", "offline", "online"] = option(
        "auto", "auto: absorb rotations into weights where the region allows, online Hadamard elsewhere; offline: "
                "absorbed only; online: online everywhere")
    online: Literal["all", "norms", "activations"] = option(
        "all", "which regions may take an online Hadamard: all, norms (norm outputs the residual rotation could not "
               "take) or activations (GELU outputs and gated products, before down_proj/fc2)")


def rotate_rows(weight: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``Q^T W`` (``W`` stored ``[C_in, C_out]``): what a sink needs when its input is ``x Q``."""
    return q.T @ weight


def _block_diagonal_rows(weight: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``Q^T`` applied to every head-sized block of rows."""
    d = q.shape[0]
    blocks = weight.reshape(-1, d, weight.shape[1])
    return np.einsum("ki,hkc->hic", q, blocks).reshape(weight.shape)


def _block_diagonal_columns(matrix: np.ndarray, q: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """``M (I kron Q)`` on the column blocks listed in ``heads`` (other columns untouched)."""
    d = q.shape[0]
    result = matrix.copy()
    for head in heads:
        columns = slice(head * d, (head + 1) * d)
        result[..., columns] = matrix[..., columns] @ q
    return result


@register
class Rotate(Pass):
    name = "rotate"
    summary = "Rotate regions by Hadamard (or random orthogonal) matrices: offline into producers, online otherwise."
    Options = RotateOptions

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        graph = model.graph
        notes: list[str] = []
        residual, rotated_norms = self._residual(graph, notes) if self.options.mode != "online" else ({}, set())
        absorbed, online, skipped = [], [], {}
        for region in find_regions(graph).regions:
            name = region.name
            if region.producer is not None and id(region.producer) in rotated_norms:
                absorbed.append(f"{name} ({region.kind}, by the residual stream rotation)")
            elif any(UNROTATE in s.linear.matmul.metadata_props for s in region.sinks):
                continue  # read through a Q^T node of the residual rotation: already exact, not a layer
            elif region.kind == ONLINE_ROTATION:
                skipped[name] = region.refused[ROTATE]  # a second Hadamard would only cost time
            elif region.can(ROTATE) and self.options.mode != "online":
                self._absorb(graph, region, notes)
                absorbed.append(f"{name} ({region.kind}{', per head' if region.kind == 'attention' else ''})")
            elif self.options.mode != "offline" and not self._may_go_online(region):
                skipped[name] = f"online={self.options.online} leaves {region.kind} regions unrotated"
            elif self.options.mode != "offline":
                for value in dict.fromkeys(s.linear.input for s in region.sinks):
                    # The sinks' weights say how many channels they read, whatever the exporter's shapes say.
                    channels = next(s.linear.in_features for s in region.sinks if s.linear.input is value)
                    self._online(model, region, value, channels, notes)
                    online.append(f"{value.name} ({rotation_plan(channels).describe()})")
            else:
                skipped[name] = region.refused.get(ROTATE, "mode=offline")
        if self.options.kind == "random" and online:
            notes.append("online rotations use Hadamard factors (a dense random rotation online would cost O(n^2))")
        rotated = any(stream.get("rotated") for stream in residual.values())
        return PassOutcome(bool(absorbed or online or rotated),
                           {"residual": residual, "absorbed": absorbed, "online": online, "skipped": skipped,
                            "notes": notes})

    def _may_go_online(self, region: Region) -> bool:
        """``online=``: each online Hadamard costs a pair of small matmuls per token, so a user may pick where."""
        if self.options.online == "all":
            return True
        return (region.kind in NORM_KINDS) == (self.options.online == "norms")

    def _matrix(self, n: int) -> np.ndarray:
        return orthogonal_matrix(n, self.options.kind, self.options.seed)

    def _residual(self, graph: ir.Graph, notes: list[str]) -> tuple[dict[str, dict], set[int]]:
        """Rotate every admissible residual stream; per stream what was done or why not, and the norms rotated."""
        report: dict[str, dict] = {}
        norms: set[int] = set()
        for stream in find_streams(graph):
            if not stream.can(ROTATE):
                report[stream.name] = {"rotated": False, "reason": stream.refused[ROTATE]}
                continue
            converted = center_stream(graph, stream, notes) if stream.needs_centering else []
            inserted = rotate_stream(graph, stream, self._matrix(stream.channels), notes)
            norms |= {id(r.node) for r in stream.readers if r.kind == "rmsnorm" and r.plain}
            report[stream.name] = {
                "rotated": True, "channels": stream.channels,
                "writers": [f"{w.name} ({w.kind})" for w in stream.writers],
                "readers": [f"{r.name} ({r.kind})" for r in stream.readers],
                "layernorm_to_rmsnorm": converted, "unrotate": inserted,
            }
        return report, norms

    def _absorb(self, graph: ir.Graph, region: Region, notes: list[str]) -> None:
        producer = region.absorber
        if region.kind == "attention":
            q = self._matrix(region.head_dim)
            heads = np.unique(np.concatenate([s.channel_map for s in region.sinks]) // region.head_dim)
            columns = lambda m: _block_diagonal_columns(m, q, heads)  # noqa: E731
            rows = lambda sink, w: _block_diagonal_rows(w, q)  # noqa: E731
        else:
            q = self._matrix(region.channels)
            columns = lambda m: m @ q  # noqa: E731
            rows = lambda sink, w: rotate_rows(w, q)  # noqa: E731
        for sink in region.sinks:
            rewrite_constant(graph, sink.linear.matmul, 1, lambda w, sink=sink: rows(sink, w), notes)
        rewrite_constant(graph, producer.matmul, 1, columns, notes)
        mark_output_transformed(producer, "rotate")
        if producer.bias is not None:
            index = next(i for i, v in enumerate(producer.bias_add.inputs) if v is producer.bias)
            rewrite_constant(graph, producer.bias_add, index, lambda b: columns(b.reshape(1, -1)).reshape(b.shape),
                             notes)

    def _online(self, model: ir.Model, region: Region, value: ir.Value, channels: int, notes: list[str]) -> None:
        node = insert_hadamard(model, value, channels)
        a, b = factor_pair(channels)
        rotated = node.outputs[0]
        for sink in region.sinks:
            if sink.linear.input is not value:
                continue
            sink.linear.matmul.replace_input_with(0, rotated)
            # Q^T W = (W^T Q)^T, computed factor by factor.
            rewrite_constant(model.graph, sink.linear.matmul, 1, lambda w: rotate_last_axis(w.T, a, b).T, notes)
