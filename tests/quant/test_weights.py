"""Weight quantizers: GPTQ, clipping searches, RTN."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.quant import weights
from qcompiler.quant.spec import QuantSpec, quantize

SPECS = [QuantSpec("uint4", "group", 32, symmetric=False), QuantSpec("int4", "channel"), QuantSpec("int8", "channel"),
         QuantSpec("nvfp4"), QuantSpec("int4", "ic-group", 16)]


def _data(seed=0, k=128, n=48, rows=2048):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    # Correlated inputs with uneven channel scales, as real activations are.
    x = (rng.standard_normal((rows, 24)) @ rng.standard_normal((24, k))).astype(np.float32)
    x += 0.1 * rng.standard_normal((rows, k)).astype(np.float32)
    return w, x[: rows // 2], x[rows // 2:]


def _output_error(x, w, q):
    return float(np.sum(np.square(x @ q.dequantize() - x @ w)))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_gptq_beats_rtn_on_held_out_inputs(spec):
    w, calib, held = _data()
    hessian = calib.T.astype(np.float64) @ calib
    rtn = _output_error(held, w, weights.rtn(w, spec))
    gptq = weights.gptq(w, hessian, spec, block_size=32)
    assert _output_error(held, w, gptq) < 0.7 * rtn
    assert _output_error(held, w, weights.gptq(w, hessian, spec, act_order=True)) < 0.7 * rtn
    np.testing.assert_array_equal(spec.element.round(gptq.values), gptq.values)


def test_gptq_with_identity_hessian_is_rtn():
    w, _, _ = _data(1)
    spec = QuantSpec("int4", "channel")
    gptq = weights.gptq(w, np.eye(w.shape[0]), spec)
    np.testing.assert_array_equal(gptq.values, weights.rtn(w, spec).values)


def test_gptq_handles_dead_inputs():
    w, calib, _ = _data(2)
    calib[:, 5] = 0.0
    q = weights.gptq(w, calib.T.astype(np.float64) @ calib, QuantSpec("int8", "channel"))
    assert np.all(q.dequantize()[5] == 0) and np.all(np.isfinite(q.dequantize()))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_mse_clipping_never_worse_than_min_max(spec):
    w, _, _ = _data(3)
    w[0, 0] = 2.0  # one outlier weight makes min-max coarse for its scale entry
    rtn = np.sum(np.square(weights.rtn(w, spec).dequantize() - w))
    assert np.sum(np.square(weights.mse(w, spec).dequantize() - w)) <= rtn * (1 + 1e-6)


def test_output_error_clipping_never_worse_than_min_max():
    w, calib, _ = _data(4)
    spec = QuantSpec("uint4", "group", 32, symmetric=False)
    searched = weights.clip_search(w, spec, weights.output_error(calib[:256]))
    assert _output_error(calib[:256], w, searched) <= _output_error(calib[:256], w, quantize(w, spec, "weight")) * (1 + 1e-6)


def _objective(w, q, hessian, damp):
    h = hessian + damp * np.mean(np.diag(hessian)) * np.eye(len(hessian))
    delta = w.astype(np.float64) - q.dequantize()
    return float(np.sum(delta * (h @ delta)))


@pytest.mark.parametrize("spec", [QuantSpec("uint4", "group", 32, symmetric=False), QuantSpec("int4", "channel")],
                         ids=lambda s: s.describe())
def test_refine_lowers_gptqs_objective_and_keeps_the_layout(spec):
    w, calib, held = _data(5)
    hessian = calib.T.astype(np.float64) @ calib
    gptq = weights.gptq(w, hessian, spec, damp=0.1, act_order=True)
    refined = weights.refine(w, gptq, hessian, damp=0.1, sweeps=3)
    assert _objective(w, refined, hessian, 0.1) < 0.97 * _objective(w, gptq, hessian, 0.1)
    assert _output_error(held, w, refined) < _output_error(held, w, gptq)
    np.testing.assert_array_equal(refined.scale, gptq.scale)
    np.testing.assert_array_equal(spec.element.round(refined.values), refined.values)
    assert np.count_nonzero(refined.values != gptq.values) > 0


def test_refine_is_integer_only():
    w, calib, _ = _data(6)
    q = weights.rtn(w, QuantSpec("nvfp4"))
    with pytest.raises(ValueError, match="integer"):
        weights.refine(w, q, calib.T.astype(np.float64) @ calib)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_takes_searched_clipping(act_order):
    """With an identity Hessian GPTQ is RTN, so clipped GPTQ must be the clipping search's own result."""
    w, _, _ = _data(7)
    w[3, 2] = 1.5
    spec = QuantSpec("uint4", "group", 32, symmetric=False)
    ratios = weights.clip_ratios(w, spec)
    assert np.any(ratios < 1)
    gptq = weights.gptq(w, np.eye(w.shape[0]), spec, act_order=act_order, clip=ratios)
    searched = weights.clip_search(w, spec)
    np.testing.assert_array_equal(gptq.scale, searched.scale)
    np.testing.assert_array_equal(gptq.values, searched.values)
