"""The outlier split: which channels go float, and the graph it builds computing exactly the original linear."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qcompiler.quant import outliers


def test_outlier_channels_are_those_above_the_threshold():
    np.testing.assert_array_equal(outliers.outlier_channels(np.array([0.5, 7.0, 6.0, 40.0, 1.0]), 6.0), [1, 3])
    assert outliers.outlier_channels(np.ones(8), 6.0).size == 0


def test_masked_linear_plus_float_part_is_the_original_linear_in_onnxruntime():
    """``(x m) W' + x[:, O] W[O] = x W`` when ``W'`` has rows O zeroed (the int8 side, here unquantized)."""
    rng = np.random.default_rng(0)
    w, bias = rng.standard_normal((16, 12)).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    channels = np.array([2, 9, 13])
    inlier_w = w.copy()
    inlier_w[channels] = 0.0
    x = ir.Value(name="x", shape=ir.Shape([2, 5, 16]), type=ir.TensorType(ir.DataType.FLOAT))
    weight = ir.Value(name="w", shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT),
                      const_value=ir.tensor(inlier_w))
    bias_value = ir.Value(name="b", shape=ir.Shape(bias.shape), type=ir.TensorType(ir.DataType.FLOAT),
                          const_value=ir.tensor(bias))
    matmul = ir.node("MatMul", [x, weight], name="mm")
    add = ir.node("Add", [matmul.outputs[0], bias_value], name="bias")
    add.outputs[0].name = "y"
    graph = ir.Graph([x], [add.outputs[0]], nodes=[matmul, add], initializers=[weight, bias_value],
                     opset_imports={"": 21})
    size = outliers.add_float_part(graph, x, add.outputs[0], w, channels, "w")
    masked = outliers.mask_inliers(graph, x, channels, 16, [matmul], "w")
    assert size == 2 * 3 * 12  # the fp16 rows W[O]
    assert matmul.inputs[0] is masked and graph.outputs[0].name == "y"
    gather = next(n for n in graph if n.op_type == "Gather")
    assert gather.inputs[0] is x  # the float part reads the unmasked channels
    assert sorted(n.op_type for n in graph if outliers.KEY in n.metadata_props) == ["MatMul", "Mul"]  # part, mask
    session = ort.InferenceSession(ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    feed = rng.standard_normal((2, 5, 16)).astype(np.float32)
    feed[..., channels] *= 30.0  # outlier magnitudes
    float_rows = w[channels].astype(np.float16).astype(np.float32)  # LLM.int8() keeps them in half precision
    expected = feed @ inlier_w + bias + feed[..., channels] @ float_rows
    np.testing.assert_allclose(session.run(None, {"x": feed})[0], expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(expected, feed @ w + bias, rtol=1e-2, atol=5e-2)
