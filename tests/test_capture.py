"""Capture from every supported source, and one-sentence errors for bad ones."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from qcompiler import QCompilerError, load
from qcompiler.capture import SOURCE_KEY, TOKENIZER_KEY
from qcompiler.runtime import make_session


def test_builtin_minilm_records_its_tokenizer(minilm_files):
    model = ir.load(minilm_files["dynamo"])  # what load("minilm") returned, saved once for the session
    assert {v.name for v in model.graph.inputs} == {"input_ids", "attention_mask", "token_type_ids"}
    assert model.graph.outputs[0].shape[-1] == 384
    assert TOKENIZER_KEY in model.metadata_props


def test_onnx_path_ir_model_and_proto_load_the_same_graph(minilm_files):
    from_path = load(minilm_files["dynamo"])
    assert load(from_path) is from_path
    from_proto = load(onnx.load(minilm_files["dynamo"]))
    assert len(from_proto.graph) == len(from_path.graph)
    assert from_path.metadata_props[SOURCE_KEY].endswith("dynamo.onnx")


def test_external_data_stays_lazy_and_loads(tmp_path, minilm):
    path = tmp_path / "ext.onnx"
    ir.save(minilm, path, external_data="ext.onnx.data")
    model = load(path)
    weights = [v.const_value for v in model.graph.initializers.values() if v.const_value.nbytes > 1024]
    assert weights and all(isinstance(w, ir.ExternalTensor) for w in weights)
    feeds = {"input_ids": np.array([[101, 2023, 102]]), "attention_mask": np.ones((1, 3), np.int64),
             "token_type_ids": np.zeros((1, 3), np.int64)}
    assert np.isfinite(make_session(model).run(None, feeds)[0]).all()


def test_torch_module_with_example_inputs():
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    model = load(module, (x,))
    out = make_session(model).run(None, {model.graph.inputs[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, module(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_hf_folder_without_tokenizer_uses_config(zoo_folder):
    model = load(zoo_folder("bert"))
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask"]
    assert TOKENIZER_KEY not in model.metadata_props


@pytest.mark.parametrize(
    "make_src, message",
    [
        (lambda p: p / "missing.onnx", "does not exist"),
        (lambda p: _write(p / "corrupt.onnx", b"\x08\x07garbage that is not protobuf"), "not a readable ONNX model"),
        (lambda p: _write(p / "notes.txt", b"hello world\n"), "not a readable ONNX model"),
        (lambda p: _mkdir(p / "empty_dir"), "not a Hugging Face model folder"),
        (lambda p: _write(p / "empty.onnx", b""), "graph has no nodes"),
    ],
)
def test_bad_model_sources_give_one_sentence(tmp_path, make_src, message):
    with pytest.raises(QCompilerError, match=message) as info:
        load(make_src(tmp_path))
    assert "\n" not in str(info.value)


def test_unknown_operator_is_named(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("FancyOp", ["x"], ["y"], domain="my.domain")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("my.domain", 1)]), path)
    with pytest.raises(QCompilerError, match="operator 'FancyOp' from domain 'my.domain', which neither ONNX nor onnxruntime"):
        load(path)


def test_missing_external_data_is_named(tmp_path, minilm):
    path = tmp_path / "m.onnx"
    ir.save(minilm, path, external_data="m.onnx.data")
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(QCompilerError, match="external data 'm.onnx.data' that is missing"):
        load(path)


def test_unsupported_source_type():
    with pytest.raises(QCompilerError, match="Cannot load a model from a int"):
        load(42)
    with pytest.raises(QCompilerError, match="needs example inputs"):
        load(torch.nn.Linear(2, 2))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _mkdir(path):
    path.mkdir()
    return path


def test_a_captured_model_holds_no_weight_the_exporter_lifted_away(zoo_folder, monkeypatch):
    """Regression: the exporter's former parameter inputs kept every torch weight alive after passes replaced them."""
    import gc
    import weakref

    from qcompiler import capture
    from qcompiler.pass_manager import PassManager
    from qcompiler.pipeline import parse_pipeline
    from qcompiler.testing import zoo_calibration

    parameters = []
    original = capture.load_hf_module

    def recording(folder):
        config, module = original(folder)
        parameters.extend(weakref.ref(p) for p in module.parameters() if p.dim() == 2)
        return config, module

    monkeypatch.setattr(capture, "load_hf_module", recording)
    model = load(zoo_folder("llama"))
    assert parameters and not [v for v, count in model.graph.inputs._ref_counter.items() if count <= 0]
    PassManager(parse_pipeline("normalize,rotate"), calibration=zoo_calibration(model), progress=False).run(model)
    gc.collect()
    assert all(ref() is None for ref in parameters)  # every 2-D weight was rotated: nothing holds the originals
