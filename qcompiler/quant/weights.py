"""Weight quantizers: turn a MatMul weight ``W [K, N]`` into grid values with scales.

- ``rtn``: round to nearest with the min-max range of each scale entry.
- ``mse``: per scale entry, the clipping ratio of a grid that minimises ``||Q(W) - W||^2``.
- ``clip_search`` with an output-error measure: AWQ's clipping, ``||X Q(W) - X W||^2``.
- ``gptq``: quantize input rows one at a time and push each row's error onto the rows not
  yet quantized through the inverse Hessian ``H = X^T X`` (dampened), in lazy blocks:

      err = (w_k - q_k) / [H^-1]_kk      W[k+1:] -= [H^-1]_{k,k+1:}^T err

  with ``H^-1`` taken as its upper Cholesky factor, as in the GPTQ paper. Group scales
  may come from a clipping search (``clip``) instead of the min-max range.
- ``refine``: coordinate descent over integer codes on GPTQ's own objective
  ``(w - q)^T H (w - q)`` per output column. GPTQ decides each row once, against rows not
  yet quantized; a later row's rounding can make an earlier decision the wrong one, and a
  sweep that moves any code by one step when that lowers the objective recovers some of it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from qcompiler.quant.spec import QuantizedTensor, QuantSpec, broadcast, quantize, reduce

ErrorMeasure = Callable[[np.ndarray, int | None, int], np.ndarray]


def rtn(weight: np.ndarray, spec: QuantSpec) -> QuantizedTensor:
    return quantize(weight, spec, "weight")


def weight_error(delta: np.ndarray, axis: int | None, block: int) -> np.ndarray:
    """Squared weight error summed per scale entry."""
    return reduce(np.square(delta, dtype=np.float64), axis, block, np.add)


def output_error(x: np.ndarray) -> ErrorMeasure:
    """Squared error of ``x @ W`` attributed to each scale entry (AWQ's clipping objective).

    Per output channel it is exact; per group along the input it is the error of the
    group's partial product, which is how AWQ scores group clipping.
    """
    x = np.asarray(x, np.float64)

    def measure(delta: np.ndarray, axis: int | None, block: int) -> np.ndarray:
        delta = delta.astype(np.float64)
        if axis is None:
            return np.asarray(np.sum(np.square(x @ delta)))
        if axis == 1 and block == 0:
            return np.sum(np.square(x @ delta), axis=0)
        if axis == 0 and block > 0:
            starts = range(0, delta.shape[0], block)
            return np.stack([np.sum(np.square(x[:, s:s + block] @ delta[s:s + block]), axis=0) for s in starts])
        return weight_error(delta, axis, block)

    return measure


def clip_ratios(weight: np.ndarray, spec: QuantSpec, measure: ErrorMeasure = weight_error,
                grid: int = 20, min_ratio: float = 0.5) -> np.ndarray:
    """Per scale entry, the clipping ratio in ``[min_ratio, 1]`` with the least error under ``measure``."""
    weight = np.asarray(weight, np.float32)
    axis, block = spec.layout("weight", weight.shape)
    best_ratio = None
    best_error = None
    for ratio in np.linspace(1.0, min_ratio, grid):
        candidate = quantize(weight, spec, "weight", clip=float(ratio))
        error = measure(candidate.dequantize() - weight, axis, block)
        if best_error is None:
            best_ratio, best_error = np.full(error.shape, ratio, np.float32), error
            continue
        better = error < best_error
        best_ratio = np.where(better, ratio, best_ratio).astype(np.float32)
        best_error = np.where(better, error, best_error)
    return best_ratio


def clip_search(weight: np.ndarray, spec: QuantSpec, measure: ErrorMeasure = weight_error,
                grid: int = 20, min_ratio: float = 0.5) -> QuantizedTensor:
    """Round to nearest with the clipping ratios of `clip_ratios`."""
    return quantize(weight, spec, "weight", clip=clip_ratios(weight, spec, measure, grid, min_ratio))


def mse(weight: np.ndarray, spec: QuantSpec, grid: int = 20) -> QuantizedTensor:
    return clip_search(weight, spec, weight_error, grid)


def gptq(weight: np.ndarray, hessian: np.ndarray, spec: QuantSpec, *, block_size: int = 128,
         damp: float = 0.01, act_order: bool = False, clip: float | np.ndarray = 1.0) -> QuantizedTensor:
    """GPTQ over the input rows of ``W [K, N]`` with ``hessian = X^T X [K, K]``.

    Group scales (integer formats, groups along the input) are fitted when their group
    starts, from rows already corrected by earlier errors, as the reference does. With
    ``act_order`` rows go in order of decreasing ``H_kk`` and group scales are fixed up
    front from the original weight ("static groups"), so every row keeps the scale its
    position in the stored layout implies. Other granularities fit scales up front.
    ``clip`` (a scalar, or one ratio per scale entry as `clip_ratios` returns) shrinks the
    range every scale is fitted from, refitted groups included.
    """
    work = np.array(weight, np.float64)
    rows, _ = work.shape
    h = np.array(hessian, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    work[dead, :] = 0.0

    axis, block = spec.layout("weight", weight.shape)
    fitted = quantize(work.astype(np.float32), spec, "weight", clip=clip)
    scale = fitted.scale.copy()
    zero = None if fitted.zero_point is None else fitted.zero_point.copy()
    refit_groups = axis == 0 and block > 0 and spec.element.kind == "int" and not act_order

    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(rows)
    work, h = work[order], h[order][:, order]
    h[np.diag_indices(rows)] += damp * float(np.mean(np.diag(h)))
    inverse = _upper_cholesky_of_inverse(h)

    fmt = spec.element
    shape = weight.shape
    row_scales = np.broadcast_to(broadcast(scale, shape, axis, block), shape).astype(np.float32)
    row_zeros = np.zeros(shape, np.float32) if zero is None else \
        np.broadcast_to(broadcast(zero, shape, axis, block), shape).astype(np.float32)
    values = np.zeros_like(work, dtype=np.float32)
    for start in range(0, rows, block_size):
        stop = min(start + block_size, rows)
        chunk = work[start:stop].copy()
        errors = np.zeros_like(chunk)
        chunk_inverse = inverse[start:stop, start:stop]
        for i in range(stop - start):
            original = order[start + i]
            if refit_groups and original % block == 0:
                pending = np.concatenate([chunk[i:], work[stop:]])[:block].astype(np.float32)
                ratio = clip if np.ndim(clip) == 0 else clip[original // block][None]
                group = quantize(pending, spec, "weight", clip=ratio)
                group_index = original // block
                scale[group_index] = group.scale[0]
                row_scales[original:original + block] = group.scale[0]
                if zero is not None:
                    zero[group_index] = group.zero_point[0]
                    row_zeros[original:original + block] = group.zero_point[0]
            grid = fmt.round(chunk[i] / row_scales[original] + row_zeros[original])
            values[start + i] = grid
            err = (chunk[i] - (grid - row_zeros[original]) * row_scales[original]) / chunk_inverse[i, i]
            chunk[i:] -= np.outer(chunk_inverse[i, i:], err)
            errors[i] = err
        work[stop:] -= inverse[start:stop, stop:].T @ errors
    restored = np.empty_like(values)
    restored[order] = values
    return QuantizedTensor(restored, scale, zero, axis, block, spec, fitted.tensor_scale)


def refine(weight: np.ndarray, quantized: QuantizedTensor, hessian: np.ndarray, *, damp: float = 0.01,
           sweeps: int = 1) -> QuantizedTensor:
    """Lower ``(w - q)^T (H + damp mean(diag H) I) (w - q)`` per column by moving integer codes one step.

    Each sweep visits the input rows in order; for every column it takes the step (up or
    down, within the grid) that lowers the objective most, if any, and updates the
    gradient ``H (w - q)`` by that row's change. Scales and zero points stay as they are,
    so the stored layout does not change. Stops early when a sweep moves nothing.
    """
    if quantized.spec.element.kind != "int":
        raise ValueError(f"refine moves integer codes; {quantized.spec.format} is not an integer format")
    h = np.array(hessian, np.float64)
    h[np.diag_indices(len(h))] += damp * float(np.mean(np.diag(h)))
    shape = quantized.values.shape
    scale = np.broadcast_to(broadcast(quantized.scale, shape, quantized.axis, quantized.block), shape)
    zero = 0.0 if quantized.zero_point is None else \
        np.broadcast_to(broadcast(quantized.zero_point, shape, quantized.axis, quantized.block), shape)
    values = quantized.values.astype(np.float64)
    fmt = quantized.spec.element
    gradient = h @ (np.asarray(weight, np.float64) - (values - zero) * scale)
    curvature = np.diag(h)
    for _ in range(sweeps):
        moved = 0
        for k in range(shape[0]):
            step = scale[k].astype(np.float64)
            # q_k += d changes the objective by -2 d step g_k + step^2 h_kk: at most one direction gains
            linear, quadratic = 2.0 * step * gradient[k], step * step * curvature[k]
            move = np.where((quadratic < linear) & (values[k] + 1 <= fmt.qmax), 1.0,
                            np.where((quadratic < -linear) & (values[k] - 1 >= fmt.qmin), -1.0, 0.0))
            if not move.any():
                continue
            columns = np.flatnonzero(move)  # few move: update their gradient columns only (same sums, exactly)
            moved += len(columns)
            values[k] += move
            gradient[:, columns] -= np.outer(h[:, k], move[columns] * step[columns])
        if not moved:
            break
    return QuantizedTensor(values.astype(np.float32), quantized.scale, quantized.zero_point, quantized.axis,
                           quantized.block, quantized.spec, quantized.tensor_scale)


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of ``H^-1``, adding damping until ``H`` is positive definite."""
    extra = 0.0
    for _ in range(8):
        try:
            lower = np.linalg.cholesky(h + extra * np.eye(len(h)))
            inverse = np.linalg.inv(lower)
            return np.linalg.cholesky(inverse.T @ inverse).T
        except np.linalg.LinAlgError:
            extra = max(extra * 10.0, 1e-6 * float(np.mean(np.diag(h))))
    raise np.linalg.LinAlgError("the Hessian stays singular after damping")
