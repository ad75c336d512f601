"""Learning FlatQuant's transform of one linear group: ``T = P1 kron P2`` and a per-channel scale.

The linears ``W_k`` of a group read the same activation ``X``. With ``X' = (X / s) T`` and
``W_k' = T^-1 diag(s) W_k`` the float product is unchanged; the fit chooses ``P1, P2, s`` to
minimise the error the deployment's quantizers leave, relative to the float outputs::

    L = sum_k || Q_a(X') Q_w(W_k') - X W_k ||^2  /  sum_k || X W_k ||^2

Quantizers round to the target's grid with straight-through gradients (so the scales,
computed from the tensors as the deployed quantizers compute them, pass gradients too);
``P1, P2`` start at the factors given (Hadamard factors: the fit starts where rotate
ends) and ``log s`` at zero, and Adam takes a bounded number of full-batch steps. MX
and NVFP4 scales are modelled as float32 scales of the same blocks (their power-of-two
or E4M3 rounding is left out of the loss). The fit keeps the best of the starting point
and every step, so it never returns something worse than where it began.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qcompiler.quant.presets import Scheme
from qcompiler.quant.spec import QuantSpec, Role


@dataclass
class AffineFit:
    """The learned factors and scale, with the loss (relative squared error) before and after."""

    p1: np.ndarray
    p2: np.ndarray
    scale: np.ndarray | None
    start_loss: float
    loss: float
    identity_loss: float  # the group quantized with no transform at all
    steps: int


def kron_rows(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x @ (a kron b)`` on the last axis, factor by factor."""
    rows = x.reshape(-1, a.shape[0], b.shape[0])
    return torch.einsum("nij,ik,jl->nkl", rows, a, b).reshape(x.shape)


def fit_affine(x: np.ndarray, weights: list[np.ndarray], scheme: Scheme, p1: np.ndarray, p2: np.ndarray,
               learn_scale: bool, steps: int, lr: float) -> AffineFit:
    """Learn ``P1, P2`` (and ``s`` when ``learn_scale``) for rows ``x [n, C]`` read by ``weights [C, N_k]``."""
    torch.manual_seed(0)
    rows = torch.from_numpy(np.array(x, np.float32))
    mats = [torch.from_numpy(np.array(w, np.float32)) for w in weights]
    with torch.no_grad():
        references = [rows @ w for w in mats]
        denominator = float(sum(r.square().sum() for r in references)) or 1.0
    f1 = torch.nn.Parameter(torch.from_numpy(p1.astype(np.float32)))
    f2 = torch.nn.Parameter(torch.from_numpy(p2.astype(np.float32)))
    log_s = torch.nn.Parameter(torch.zeros(rows.shape[1]))
    params = [f1, f2] + ([log_s] if learn_scale else [])

    def loss_of(f1: torch.Tensor, f2: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
        s = torch.exp(log_s)
        moved = kron_rows(rows / s, f1, f2)
        if scheme.activation is not None:
            moved = fake_quant(moved, scheme.activation, "activation")
        inverse1, inverse2 = torch.linalg.inv(f1).T, torch.linalg.inv(f2).T
        total = moved.new_zeros(())
        for w, reference in zip(mats, references):
            folded = kron_rows((w * s[:, None]).T.contiguous(), inverse1, inverse2).T  # T^-1 diag(s) W
            total = total + (moved @ fake_quant(folded, scheme.weight, "weight") - reference).square().sum()
        return total / denominator

    with torch.no_grad():
        identity = float(loss_of(torch.eye(len(p1)), torch.eye(len(p2)), torch.zeros_like(log_s)))
    optimizer = torch.optim.Adam(params, lr=lr)
    best = start = None
    best_state = [p.detach().clone() for p in (f1, f2, log_s)]
    for _ in range(steps + 1):
        loss = loss_of(f1, f2, log_s)
        value = float(loss.detach())
        if start is None:
            start = value
        if best is None or value < best:
            best, best_state = value, [p.detach().clone() for p in (f1, f2, log_s)]
        if _ == steps:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    b1, b2, b_s = (t.double().numpy() for t in best_state)
    return AffineFit(b1, b2, np.exp(b_s) if learn_scale else None, start, best, identity, steps)


def fake_quant(x: torch.Tensor, spec: QuantSpec, role: Role) -> torch.Tensor:
    """Quantize-dequantize ``x`` under ``spec`` (scale layout as `qcompiler.quant.spec`), rounding straight through."""
    axis, block = spec.layout(role, tuple(x.shape))
    view, restore = _scale_rows(x, axis, block)
    fmt = spec.element
    if spec.symmetric or fmt.kind == "float":
        scale = (view.abs().amax(dim=1, keepdim=True) / fmt.max_value).clamp_min(1e-12)
        return restore(_round(view / scale, fmt) * scale)
    low = view.amin(dim=1, keepdim=True).clamp_max(0.0)
    high = view.amax(dim=1, keepdim=True).clamp_min(0.0)
    scale = ((high - low) / (fmt.qmax - fmt.qmin)).clamp_min(1e-12)
    zero = _round(fmt.qmin - low / scale, fmt)
    return restore((_round(view / scale + zero, fmt) - zero) * scale)


def _round(q: torch.Tensor, fmt) -> torch.Tensor:
    """The format's own rounding (integers clipped to range, minifloat grids), with an identity gradient."""
    rounded = torch.from_numpy(fmt.round(q.detach().numpy()))
    return q + (rounded - q).detach()


def _scale_rows(x: torch.Tensor, axis: int | None, block: int):
    """``x`` as rows that each share one scale, and the map back to ``x``'s shape."""
    if axis is None:
        return x.reshape(1, -1), lambda y: y.reshape(x.shape)
    moved = x.movedim(axis, -1)
    size = moved.shape[-1]
    if block == 0:
        flat = moved.reshape(-1, size).T
        return flat, lambda y: y.T.reshape(moved.shape).movedim(-1, axis)
    block = min(block, size)
    if size % block:
        raise ValueError(f"{size} channels do not split into groups of {block}")
    return moved.reshape(-1, block), lambda y: y.reshape(moved.shape).movedim(-1, axis)
