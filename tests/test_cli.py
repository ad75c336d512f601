"""The qcompile command: the main job end to end, listings, and bad input -> one sentence, exit 2."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
from onnx import TensorProto, helper
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from qcompiler.cli import main


@pytest.fixture
def run():
    def invoke(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def test_compile_writes_a_runnable_model_and_report(run, minilm_files, tmp_path, tokenizer, heldout_sentences):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(heldout_sentences), encoding="utf-8")
    out = tmp_path / "out"
    result = run(minilm_files["legacy"], "--calib", calib, "--tokenizer", "minilm", "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]][:2] == ["convert-opset", "simplify"]
    assert all(p["verification"] is None or max(v["relative_error"] for v in p["verification"].values()) < 1e-4
               for p in report["passes"])
    session = ort.InferenceSession(str(out / "model.onnx"))
    feeds = {k: v for k, v in tokenizer(["hello there"], return_tensors="np").items()}
    assert np.isfinite(session.run(None, feeds)[0]).all()


def test_compile_ends_with_a_summary_and_defaults_to_onnxruntime(run, zoo_folder, tmp_path):
    """What was quantized and what stayed float is on the console; a tiny calibration set is warned about."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, 256, (8, 8)).astype(np.int64),
             attention_mask=np.ones((8, 8), np.int64))
    result = run(zoo_folder("llama"), "--passes", "smooth,w4a16(weights=gptq,refine=0)", "--calib",
                 tmp_path / "calib.npz", "--batch-size", "2", "-o", tmp_path / "q")
    assert result.exit_code == 0, result.output
    assert "smooth: 9 transformed" in result.output
    assert "w4a16: quantized MatMul 15 of 19 (4 x no constant 2-D weight" in result.output
    assert "kept at 8-bit weights as the final projection: lm_head (w8a16)" in result.output
    assert "weights: " in result.output and "in the artifact" in result.output
    # 48 calibration rows for linears of 128 input channels: GPTQ says its Hessians are thin.
    assert "warning: GPTQ estimated X^T X from" in result.output
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["backend"] == "ort" and any("GPTQ estimated" in note for note in manifest["notes"])
    assert "act_order=true,damp=0.1" in manifest["pipeline"] and "scales=mse,refine=0" in manifest["pipeline"]
    quiet = run(zoo_folder("llama"), "--passes", "w8a16", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "r",
                "--quiet")
    assert quiet.exit_code == 0 and quiet.output == ""


def test_passes_lists_each_option_once_with_its_meaning(run):
    result = run("passes")
    assert result.exit_code == 0
    assert "fuse-gelu" in result.output and "normalize" in result.output
    # The quantize options are one table, not one line per preset.
    assert len(re.findall(r"^│ fallback_preset ", result.output, re.M)) == 1 and "Hessian-aware rounding" in result.output
    one = run("passes", "w4a16")
    assert one.exit_code == 0 and "uint4 g128 asym" in one.output and "head" in one.output
    unknown = run("passes", "w4a61")
    assert unknown.exit_code == 2 and "Did you mean 'w4a16'" in unknown.output


def test_inspect_reports_outliers_as_json(run, minilm_files, tmp_path, heldout_sentences):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(heldout_sentences[:8]), encoding="utf-8")
    result = run("inspect", minilm_files["dynamo"], "--calib", calib, "--tokenizer", "minilm", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ops"]["LayerNormalization"] == 13 and len(data["linears"]) == 37
    ffn_inputs = [row for row in data["outliers"] if row["channels"] == 384 and row["sinks"] and len(row["sinks"]) == 1]
    assert max(row["channel_outlier_ratio"] for row in data["outliers"]) > 5  # MiniLM's real outlier channels
    assert ffn_inputs


def test_inspect_names_linears_by_module_path_and_groups_alike_regions(run):
    result = run("inspect", "minilm")
    assert result.exit_code == 0, result.output
    linears = result.output.split("linears (y = x W + b)")[1].split("regions (")[0]
    assert "encoder.layer.0.attention.self.query" in linears and "node_MatMul" not in linears
    # MiniLM's 13 LayerNorm regions share one refusal: one row, with the count.
    row = next(line for line in result.output.splitlines() if line.startswith("│ layernorm"))
    assert "│      13 │" in row
    verbose = run("inspect", "minilm", "--verbose")
    assert verbose.exit_code == 0 and "node_MatMul" in verbose.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope.onnx", "-o", "{out}"], "does not exist"),
        (["{bad}", "-o", "{out}"], "not a readable ONNX model"),
        (["{model}", "--passes", "simplfy", "-o", "{out}"], "Unknown pass 'simplfy'"),
        (["{model}", "--passes", "convert-opset(version=abc)", "-o", "{out}"], "must be an integer"),
        (["{float_model}", "--calib", "{nan}", "-o", "{out}"], "contains NaN or Inf"),
        (["{model}", "--calib", "{wrong_dtype}", "-o", "{out}"], "dtype float32 but the model expects int64"),
        (["{model}", "-o", "{existing}"], "is not empty"),
    ],
)
def test_bad_input_is_one_sentence_exit_2_and_no_output(run, minilm_files, tmp_path, args, message):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not onnx")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    float_model = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])), float_model)
    nan = tmp_path / "nan.npz"
    values_with_nan = np.ones((4, 4), np.float32)
    values_with_nan[3, 1] = np.inf
    np.savez(nan, x=values_with_nan)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{n: np.ones((2, 4), np.float32) for n in names})
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("user file")
    values = {"out": tmp_path / "out", "bad": bad, "float_model": float_model, "model": minilm_files["dynamo"], "nan": nan,
              "wrong_dtype": wrong, "existing": existing}
    result = run(*[a.format(**{k: str(v) for k, v in values.items()}) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.strip().startswith("error:") and result.output.count("error:") == 1
    assert not (tmp_path / "out").exists()
    assert (existing / "keep.txt").read_text() == "user file"


CNN = """
<ir_version: 10, opset_import: ["" : 11]>
cnn (float[N, 3, 16, 16] image) => (float[N, 8, 16, 16] features) {
    conv = Conv <pads: ints = [1, 1, 1, 1]> (image, kernel)
    bn = BatchNormalization (conv, scale, bias, mean, var)
    features = HardSigmoid(bn)
}
"""


def test_a_cnn_is_quantized_and_survives_transforms(run, tmp_path):
    """Regression: on a CNN, w8a8 wrote an FP32 copy as a success and smooth crashed drawing zero channel plots."""
    import onnx_ir as ir

    from qcompiler.testing import model_from_text

    rng = np.random.default_rng(0)
    weights = {"kernel": rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "scale": np.ones(8, np.float32),
               "bias": np.zeros(8, np.float32), "mean": np.zeros(8, np.float32), "var": np.ones(8, np.float32)}
    model = tmp_path / "cnn.onnx"
    ir.save(model_from_text(CNN, weights), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=rng.standard_normal((16, 3, 16, 16)).astype(np.float32))
    quantized = run(model, "--passes", "smooth,w8a8", "--calib", calib, "-o", tmp_path / "q")
    assert quantized.exit_code == 0, quantized.output
    coverage = json.loads((tmp_path / "q" / "report.json").read_text())["passes"][-1]["details"]["coverage"]
    assert coverage == {"Conv": {"quantized": 1, "float": 0, "float_reasons": {}}}
    inspected = run("inspect", model, "--json")
    [conv] = json.loads(inspected.output)["convolutions"]
    assert {k: conv[k] for k in ("input", "in", "out", "kernel", "groups")} == {
        "input": "image", "in": 3, "out": 8, "kernel": [3, 3], "groups": 1}
    smoothed = run(model, "--passes", "smooth", "--calib", calib, "-o", tmp_path / "s")
    assert smoothed.exit_code == 0, smoothed.output
    assert (tmp_path / "s" / "model.onnx").is_file() and not (tmp_path / "s" / "channels.png").exists()

