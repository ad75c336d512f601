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
