"""Low-rank compensation: LoRC's and EoRA's factors, and the branch they become in the graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qcompiler.quant import lowrank, weights
from qcompiler.quant.spec import QuantSpec

SPEC = QuantSpec("uint4", "group", 32, symmetric=False)


def _layer(seed=0, k=96, n=64, rows=1024):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    scales = np.where(rng.random(k) < 0.05, 20.0, 1.0)  # a few outlier channels, as real activations have
    x = (rng.standard_normal((rows, k)) * scales).astype(np.float32)
    return w, x[: rows // 2], x[rows // 2:]


def test_lorc_is_the_truncated_svd_of_the_weight_error():
    w, _, _ = _layer()
    error = w - weights.rtn(w, SPEC).dequantize()
    a, b = lowrank.lorc_factors(error, 8)
    assert a.shape == (96, 8) and b.shape == (8, 64)
    s = np.linalg.svd(error.astype(np.float64), compute_uv=False)
    # Eckart-Young: what is left is exactly the energy of the discarded singular values.
    np.testing.assert_allclose(np.sum(np.square(error - a @ b)), np.sum(s[8:] ** 2), rtol=1e-4)
    np.testing.assert_allclose(np.abs(a).max(), np.abs(b).max(), rtol=0.5)  # singular values split evenly


def test_eora_beats_lorc_on_held_out_outputs_and_grows_with_rank():
    w, calib, held = _layer()
    error = w - weights.rtn(w, SPEC).dequantize()
    hessian = calib.T.astype(np.float64) @ calib

    def residual(a, b):
        return float(np.sum(np.square(held @ (error - a @ b))))

    plain = residual(np.zeros((96, 1)), np.zeros((1, 64)))
    lorc = residual(*lowrank.lorc_factors(error, 8))
    eora = [residual(*lowrank.eora_factors(error, hessian, rank)) for rank in (4, 8, 16)]
    assert eora[1] < 0.6 * lorc < 0.6 * plain
    assert eora[0] > eora[1] > eora[2]


def test_eora_with_white_inputs_is_lorc():
    w, _, _ = _layer()
    error = w - weights.rtn(w, SPEC).dequantize()
    a, b = lowrank.eora_factors(error, np.eye(96) * 500.0, 8)
    c, d = lowrank.lorc_factors(error, 8)
    np.testing.assert_allclose(a @ b, c @ d, atol=1e-6)


@pytest.mark.parametrize("storage", ["fp16", "int8"])
def test_the_branch_adds_x_a_b_after_the_bias_in_onnxruntime(storage):
    rng = np.random.default_rng(3)
    w, bias = rng.standard_normal((16, 12)).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    a, b = rng.standard_normal((16, 4)).astype(np.float32), rng.standard_normal((4, 12)).astype(np.float32)
    x = ir.Value(name="x", shape=ir.Shape([2, 5, 16]), type=ir.TensorType(ir.DataType.FLOAT))
    weight = ir.Value(name="w", shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(w))
    bias_value = ir.Value(name="b", shape=ir.Shape(bias.shape), type=ir.TensorType(ir.DataType.FLOAT),
                          const_value=ir.tensor(bias))
    matmul = ir.node("MatMul", [x, weight], name="mm")
    add = ir.node("Add", [matmul.outputs[0], bias_value], name="bias")
    add.outputs[0].name = "y"
    graph = ir.Graph([x], [add.outputs[0]], nodes=[matmul, add], initializers=[weight, bias_value], opset_imports={"": 21})
    a, b = lowrank.stored(a, storage), lowrank.stored(b, storage)
    size = lowrank.add_branch(graph, x, add.outputs[0], a, b, storage, "w")
    assert size == (2 * (64 + 48) if storage == "fp16" else 64 + 48 + 4 * (4 + 12))  # int8: a scale per column
    assert graph.outputs[0].name == "y" and graph.outputs[0].producer().op_type == "Add"
    session = ort.InferenceSession(ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    feed = rng.standard_normal((2, 5, 16)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": feed})[0], feed @ w + bias + (feed @ a) @ b, rtol=1e-4,
                               atol=1e-4)
