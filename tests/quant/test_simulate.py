"""The simulate form computes what the numpy arithmetic says, in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from qcompiler.quant.presets import PRESETS
from qcompiler.quant.simulate import dequantized_weight, quantized_activation, weight_is_native
from qcompiler.quant.spec import QuantSpec, fake_quant, quantize
from qcompiler.runtime import make_session
from qcompiler.testing import linear_model


def _simulate(weight, x, weight_spec, act_spec, bounds=None):
    model, matmul = linear_model(weight, x.shape[1])
    graph = model.graph
    quantized = quantize(weight, weight_spec, "weight")
    matmul.replace_input_with(1, dequantized_weight(graph, quantized, "w", matmul))
    graph.initializers.pop("w")
    if act_spec is not None:
        matmul.replace_input_with(0, quantized_activation(graph, graph.inputs[0], act_spec, bounds, weight.shape[0]))
    return make_session(model).run(None, {"x": x})[0], quantized


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_as_its_numpy_arithmetic(preset):
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((96, 40)) * 0.1).astype(np.float32)
    x = (rng.standard_normal((2, 5, 96)) * np.exp(rng.standard_normal(96))).astype(np.float32)
    scheme = PRESETS[preset][0]
    bounds = None
    if scheme.activation is not None and not scheme.activation.dynamic:
        bounds = (float(x.min()), float(x.max()))
    y, quantized = _simulate(weight, x, scheme.weight, scheme.activation, bounds)
    x_q = x if scheme.activation is None else fake_quant(x.reshape(-1, 96), scheme.activation, "activation").reshape(x.shape)
    expected = x_q @ quantized.dequantize()
    np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


@pytest.mark.parametrize("spec", [
    QuantSpec("int8", "token", dynamic=True, symmetric=False),
    QuantSpec("int4", "group", 32, dynamic=True),
    QuantSpec("fp8-e5m2", "token", dynamic=True),
    QuantSpec("fp8-e4m3", "tensor", dynamic=True),
    QuantSpec("fp4-e2m1", "token", dynamic=True),
    QuantSpec("uint8", "tensor", symmetric=False),
    QuantSpec("fp4-e2m1", "tensor"),
])
def test_activation_granularities_match_numpy(spec):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 7, 64)) * 3).astype(np.float32)
    weight = np.eye(64, dtype=np.float32)
    bounds = None if spec.dynamic else (float(x.min()), float(x.max()))
    y, _ = _simulate(weight, x, QuantSpec("int8", "channel"), spec, bounds)
    rows = x.reshape(-1, 64)
    if spec.dynamic:
        expected = fake_quant(rows, spec, "activation")
    else:
        expected = quantize(rows, spec, "activation", bounds=(np.float32(bounds[0]), np.float32(bounds[1]))).dequantize()
    expected = expected @ quantize(weight, QuantSpec("int8", "channel"), "weight").dequantize()
    np.testing.assert_allclose(y.reshape(-1, 64), expected, rtol=1e-5, atol=1e-5)


def test_native_weights_are_dequantize_nodes_and_others_pre_dequantized():
    weight = np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)
    for spec, native in [(QuantSpec("uint4", "group", 32, symmetric=False), True), (QuantSpec("nvfp4"), False),
                         (QuantSpec("fp8-e4m3", "channel"), True), (QuantSpec("mxfp4"), False)]:
        model, matmul = linear_model(weight, 3)
        value = dequantized_weight(model.graph, quantize(weight, spec, "weight"), "w", matmul)
        assert weight_is_native(spec) is native
        producer = value.producer()
        assert (producer is not None and producer.op_type == "DequantizeLinear") is native
        if native:
            assert producer.inputs[0].const_value.dtype == spec.element.onnx_type
