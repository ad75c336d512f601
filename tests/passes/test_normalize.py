"""Normalization: one canonical form whatever the exporter, outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from qcompiler.analysis.linears import find_linears
from qcompiler.calibration import data as calib_data
from qcompiler.inspection import op_summary
from qcompiler.pass_manager import PassManager
from qcompiler.pipeline import parse_pipeline
from qcompiler.runtime import make_session, run_batches
from qcompiler.testing import random_feeds
from qcompiler.verify import compare_outputs
from tests.zoo import EXPECTED

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def normalize(model: ir.Model, batches) -> tuple[ir.Model, dict]:
    """Normalize in place; return the per-output comparison against the original outputs."""
    before = run_batches(make_session(model), batches)
    PassManager(parse_pipeline("normalize"), verify=False, progress=False).run(model)
    after = run_batches(make_session(model), batches)
    return model, compare_outputs(before, after)


@pytest.mark.parametrize("export", ["dynamo", "legacy"])
def test_minilm_exports_normalize_to_the_same_form(minilm_files, tokenizer, heldout_sentences, export):
    model = ir.load(minilm_files[export])
    data = calib_data.from_sentences(heldout_sentences, tokenizer, NAMES, batch_size=8)
    model, errors = normalize(model, data.batches)
    ops = op_summary(model)
    assert ops["LayerNormalization"] == 13
    assert ops["Gelu"] == 6
    assert not {"ReduceMean", "Erf", "Sqrt", "Pow", "Gemm"} & set(ops)
    assert len(find_linears(model.graph)) == 37  # 6 layers x 6 + pooler
    # The legacy export leaves the attention context's channel axis symbolic; the weights fill it in.
    assert all(isinstance(linear.input.shape[-1], int) for linear in find_linears(model.graph))
    assert model.opset_imports[""] == 23
    for name, err in errors.items():
        assert err["relative_error"] < 1e-5, (name, err)


def test_legacy_llama_rmsnorms_fuse_and_its_regions_open(zoo_folder, tmp_path):
    """Regression: the legacy exporter's Div(1, Sqrt) RMSNorm fused none, so smooth found 2 of 9 regions."""
    from qcompiler.analysis.regions import SCALE, find_regions
    from qcompiler.testing import export_legacy_causal_lm, random_feeds

    model = ir.load(export_legacy_causal_lm(zoo_folder("llama"), tmp_path / "llama.onnx"))
    model, errors = normalize(model, random_feeds(model))
    assert op_summary(model)["RMSNormalization"] == 5 and "Pow" not in op_summary(model)
    assert all(err["relative_error"] < 1e-5 for err in errors.values()), errors
    regions = find_regions(model.graph)
    # 5 rmsnorm + 2 gated; the 2 attention regions stay refused, with a sentence: grouped-query
    # attention's Expand target is built with Where/Equal/ConstantOfShape at run time.
    assert len(regions.regions) == 9 and len(regions.able(SCALE)) == 7
    assert all("does not fit" in r.refused[SCALE] for r in regions.regions if r.kind == "attention")


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_tiny_architectures_capture_and_normalize_with_outputs_unchanged(captured_files, arch):
    model = ir.load(captured_files(arch))
    model, errors = normalize(model, random_feeds(model))
    ops = op_summary(model)
    layer_norms, rms_norms, gelus, linears = EXPECTED[arch]
    assert (ops["LayerNormalization"], ops["RMSNormalization"], ops["Gelu"]) == (layer_norms, rms_norms, gelus)
    assert len(find_linears(model.graph)) == linears
    assert "Gemm" not in ops
    for name, err in errors.items():
        assert err["relative_error"] < 1e-5, (name, err)


def _run_small(graph: onnx.GraphProto, opset: int, feeds: dict) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
    before = make_session(model).run(None, feeds)[0]
    PassManager(parse_pipeline("normalize"), verify=False, progress=False).run(model)
    after = make_session(model).run(None, feeds)[0]
    return model, before, after


def test_gemm_with_alpha_beta_and_transposed_weight_becomes_matmul_add():
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], alpha=0.5, beta=2.0, transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel()), helper.make_tensor("b", TensorProto.FLOAT, [5], b)],
    )
    x = rng.standard_normal((3, 4)).astype(np.float32)
    model, before, after = _run_small(graph, 13, {"x": x})
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    [linear] = find_linears(model.graph)
    assert linear.bias is not None and (linear.in_features, linear.out_features) == (4, 5)
    assert model.graph.outputs[0].name == "y"


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_subgraphs_fuse(approximate):
    if approximate == "none":
        nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                 helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["x", "a"], ["m"]),
                 helper.make_node("Mul", ["m", "half"], ["y"])]
        consts = {"sqrt2": np.sqrt(2.0), "one": 1.0, "half": 0.5}
    else:
        nodes = [helper.make_node("Pow", ["x", "three"], ["c"]), helper.make_node("Mul", ["k", "c"], ["kc"]),
                 helper.make_node("Add", ["x", "kc"], ["s"]), helper.make_node("Mul", ["r", "s"], ["rs"]),
                 helper.make_node("Tanh", ["rs"], ["t"]), helper.make_node("Add", ["t", "one"], ["a"]),
                 helper.make_node("Mul", ["half", "x"], ["hx"]), helper.make_node("Mul", ["hx", "a"], ["y"])]
        consts = {"three": 3.0, "k": 0.044715, "r": np.sqrt(2 / np.pi), "one": 1.0, "half": 0.5}
    inits = [helper.make_tensor(k, TensorProto.FLOAT, [], [v]) for k, v in consts.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], inits)
    x = np.linspace(-4, 4, 12, dtype=np.float32).reshape(2, 6)
    model, before, after = _run_small(graph, 17, {"x": x})
    assert [n.op_type for n in model.graph] == ["Gelu"]
    assert model.graph.node(0).attributes["approximate"].value == approximate
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)


def test_decomposed_layernorm_with_tiny_epsilon_fuses():
    """BERT's 1e-12 epsilon must survive simplification so the LayerNorm is recognised."""
    rng = np.random.default_rng(1)
    gamma, beta = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1]), helper.make_node("Sub", ["x", "mu"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["d2"]), helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["n"]), helper.make_node("Mul", ["n", "gamma"], ["g"]),
             helper.make_node("Add", ["g", "beta"], ["y"])]
    inits = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]), helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-12]),
             helper.make_tensor("gamma", TensorProto.FLOAT, [8], gamma), helper.make_tensor("beta", TensorProto.FLOAT, [8], beta)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])], inits)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    model, before, after = _run_small(graph, 14, {"x": x})
    assert [n.op_type for n in model.graph] == ["LayerNormalization"]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_outputs_that_copy_one_value_keep_their_names():
    """Regression (found by the fuzz suite): outputs y and aux, both Identity of one MatMul, came out as aux and
    aux_alias_1, and verification failed with KeyError: 'y'."""
    from qcompiler.testing import assert_function_preserved, model_from_text

    text = """
        <ir_version: 10, opset_import: ["" : 23]>
        g (float[2, 4, 8] x) => (float[2, 4, 8] y, float[2, 4, 8] aux) <float[8, 8] w> {
            h = MatMul (x, w)
            y = Identity (h)
            aux = Identity (h)
        }"""
    weight = {"w": np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)}
    before, model = model_from_text(text, weight), model_from_text(text, weight)
    PassManager(parse_pipeline("normalize"), verify=False, progress=False).run(model)
    assert [value.name for value in model.graph.outputs] == ["y", "aux"]
    feeds = [{"x": np.random.default_rng(1).standard_normal((2, 4, 8)).astype(np.float32)}]
    assert_function_preserved(before, model, feeds)


def test_converting_to_an_older_opset_is_one_sentence():
    """Regression (found by the fuzz suite): a downgrade refused with two sentences of the converter's internals."""
    from qcompiler.errors import QCompilerError
    from qcompiler.testing import model_from_text

    model = model_from_text("""
        <ir_version: 10, opset_import: ["" : 23]>
        g (float[2, 8] x) => (float[2, 8] y) { y = Relu (x) }""")
    with pytest.raises(QCompilerError) as refused:
        PassManager(parse_pipeline("convert-opset(version=18)"), verify=False, progress=False).run(model)
    message = str(refused.value)
    assert message.startswith("convert-opset converts to newer opsets only") and message.count(". ") == 0
