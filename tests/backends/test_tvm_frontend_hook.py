"""The one private TVM name qcompiler uses (`qcompiler.backends.tvm.frontend_hook`) still works."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

tvm = pytest.importorskip("tvm", reason="apache-tvm is not importable, so the TVM backend cannot compile kernels")

from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import onnx_frontend  # noqa: E402

from qcompiler.backends.tvm.frontend_hook import extra_converters  # noqa: E402


def test_frontend_still_looks_ops_up_in_the_private_table():
    table = getattr(onnx_frontend, "_get_convert_map", None)
    if table is None:
        pytest.fail("TVM's onnx_frontend no longer has _get_convert_map; update qcompiler/backends/tvm/frontend_hook.py")
    assert "MatMul" in table()


class _Double(onnx_frontend.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return relax.op.multiply(inputs[0], relax.const(2.0))


def _custom_op_model() -> bytes:
    x = ir.Value(name="x", shape=ir.Shape([2, 3]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("Double", [x], domain="test.domain", name="double")
    node.outputs[0].name, node.outputs[0].shape, node.outputs[0].type = "y", x.shape, x.type
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], opset_imports={"": 17, "test.domain": 1})
    return ir.serde.serialize_model(ir.Model(graph, ir_version=10))


def test_extra_converters_apply_inside_the_block_only():
    proto = _custom_op_model()
    with extra_converters({"Double": _Double}):
        module = onnx_frontend.from_onnx(proto, shape_dict={"x": [2, 3]})
    executable = tvm.compile(module, "llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), 2 * x)
    assert "Double" not in onnx_frontend._get_convert_map()
    with pytest.raises(Exception):  # the original table is back: the op is unknown again
        onnx_frontend.from_onnx(proto, shape_dict={"x": [2, 3]})
