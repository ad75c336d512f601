"""The private onnxscript names qcompiler relies on still exist and still do their job.

qcompiler imports them in one module (`qcompiler.onnxscript_fusions`); an onnxscript
release that moves them fails here with a message that says where to look, instead of
failing as a confusing import error deep inside normalization.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from qcompiler.onnxscript_fusions import fuse_layer_normalization, fuse_rms_normalization
from qcompiler.testing import assert_function_preserved, model_from_text


@pytest.mark.parametrize("module, function", [
    ("onnxscript.rewriter.rules.fusion._layer_norm", "fuse_layer_normalization"),
    ("onnxscript.rewriter.rules.fusion._rms_normalization", "fuse_rms_normalization"),
])
def test_private_fusion_rules_are_where_qcompiler_expects_them(module, function):
    try:
        found = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"onnxscript moved {module}.{function} ({exc}); update qcompiler/onnxscript_fusions.py")
    assert callable(found)


DECOMPOSED_RMSNORM = """
<ir_version: 10, opset_import: ["" : 23]>
rms (float[2, 4, 8] x) => (float[2, 4, 8] y) {
    squared = Pow(x, two)
    mean = ReduceMean <keepdims: int = 1, noop_with_empty_axes: int = 0> (squared, axes)
    shifted = Add(mean, eps)
    root = Sqrt(shifted)
    inverse = Reciprocal(root)
    normed = Mul(x, inverse)
    y = Mul(normed, gamma)
}
"""


def test_rms_fusion_still_fuses_what_hugging_face_exports():
    weights = {"two": np.array(2.0, np.float32), "eps": np.array(1e-6, np.float32),
               "axes": np.array([-1], np.int64), "gamma": np.arange(1, 9, dtype=np.float32)}
    before, model = model_from_text(DECOMPOSED_RMSNORM, weights), model_from_text(DECOMPOSED_RMSNORM, weights)
    assert fuse_rms_normalization(model) == 1
    assert [n.op_type for n in model.graph] == ["RMSNormalization"]
    feeds = [{"x": np.random.default_rng(0).standard_normal((2, 4, 8)).astype(np.float32)}]
    assert_function_preserved(before, model, feeds)
    assert fuse_layer_normalization(model) == 0  # nothing left to fuse


def test_onnx_ir_still_keeps_former_graph_inputs_and_the_workaround_releases_them():
    """When this fails on the first assert, onnx_ir fixed the leak: delete qcompiler/onnx_ir_workarounds.py."""
    import onnx_ir as ir

    from qcompiler.onnx_ir_workarounds import release_former_inputs

    graph = ir.Graph([], [], nodes=[], name="g")
    weight = ir.Value(name="w")
    weight.const_value = ir.tensor(np.zeros(3, np.float32))
    graph.inputs.append(weight)
    graph.inputs.remove(weight)
    assert weight in graph.inputs._ref_counter, "onnx_ir no longer keeps former inputs: remove the workaround"
    assert release_former_inputs(graph) == 1
    assert weight not in graph.inputs._ref_counter and weight.const_value is None
