"""Artifacts: written atomically with a manifest, run and benchmarked from the CLI, refused when damaged."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from qcompiler.artifact import open_artifact
from qcompiler.backend import Backend
from qcompiler.backends.simulate.backend import SimulateBackend
from qcompiler.cli import _guard, main
from qcompiler.errors import QCompilerBug, QCompilerError


@pytest.fixture(scope="module")
def artifact(normalized_files, tmp_path_factory, sentences):
    folder = tmp_path_factory.mktemp("artifact") / "w8a8"
    calib = folder.parent / "calib.txt"
    calib.write_text("\n".join(sentences), encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(main, [str(normalized_files("minilm")), "--passes", "smooth,w8a8", "--backend", "ort",
                                  "--calib", str(calib), "--tokenizer", "minilm", "-o", str(folder), "--quiet"])
    assert result.exit_code == 0, result.output
    return folder


def test_manifest_records_what_a_deployer_needs(artifact):
    path, manifest = open_artifact(artifact)
    assert path.is_file() and manifest["backend"] == "ort" and len(manifest["sha256"]) == 64
    assert "smooth(" in manifest["pipeline"] and "w8a8(" in manifest["pipeline"] and manifest["versions"]["onnxruntime"]
    assert set(manifest["files"]) == {"model.onnx", "report.json", "report.md", "channels.png", "outliers.png",
                                      "weight_sqnr.png"}
    layers = manifest["layers"]
    assert len(layers) == 37 and all(layer["kernel"].startswith("MatMulIntegerToFloat") for layer in layers.values())
    embedding = manifest["fidelity"]["embedding"]
    assert 0.98 < embedding["mean_cosine"] < 1.0
    report = (artifact / "report.md").read_text()
    assert "MatMulIntegerToFloat" in report and "![channels.png](channels.png)" in report
    # The summary opens the report: what was quantized, what each transform did, the bytes.
    assert "## Summary" in report and "- w8a8: quantized MatMul 37 of 49" in report and "- smooth: " in report
    assert manifest["summary"][-1].startswith("weights: ") and manifest["inputs"][0]["name"] == "input_ids"


def test_run_and_bench(artifact, tmp_path, tokenizer):
    encoded = tokenizer(["a sentence to run", "and another"], padding=True, return_tensors="np")
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, **{k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
    runner = CliRunner()
    out = tmp_path / "out.npz"
    result = runner.invoke(main, ["run", str(artifact), "--inputs", str(inputs), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert np.load(out)["layer_norm_12"].shape[:2] == encoded["input_ids"].shape
    # It says what ran on what, in the words of this command.
    assert "ran the ort artifact" in result.output and "input_ids [2, " in result.output and "min " in result.output
    again = runner.invoke(main, ["run", str(artifact), "--inputs", str(inputs), "-o", str(out)])
    assert again.exit_code == 2 and "will not overwrite" in again.output
    text = tmp_path / "inputs.txt"
    text.write_text("a sentence\n")
    wrong = runner.invoke(main, ["run", str(artifact), "--inputs", str(text)])
    assert wrong.exit_code == 2 and "takes an .npz of named input arrays" in wrong.output
    np.savez(tmp_path / "extra.npz", ids=encoded["input_ids"].astype(np.int64))
    named = runner.invoke(main, ["run", str(artifact), "--inputs", str(tmp_path / "extra.npz")])
    assert named.exit_code == 2 and "calibration" not in named.output and "extra.npz" in named.output
    bench = runner.invoke(main, ["bench", str(artifact), "--batch", "2", "--sequence", "16", "--runs", "3"])
    assert bench.exit_code == 0, bench.output
    assert "ratio to fp32" in bench.output and "synthetic inputs: input_ids [2, 16]" in bench.output
    given = runner.invoke(main, ["bench", str(artifact), "--inputs", str(inputs), "--runs", "3"])
    assert given.exit_code == 0, given.output
    assert f"inputs from {inputs}: input_ids [2, {encoded['input_ids'].shape[1]}]" in given.output


def test_damaged_artifacts_are_refused(artifact, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    with open(copy / "model.onnx", "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(QCompilerError, match="partial"):
        open_artifact(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(QCompilerError, match="corrupt"):
        open_artifact(copy)
    (copy / "manifest.json").unlink()
    result = CliRunner().invoke(main, ["run", str(copy), "--inputs", str(copy / "x.npz")])
    assert result.exit_code == 2 and "not a qcompiler artifact" in result.output


def test_eval_reads_lowered_artifacts_layer_by_layer(artifact, minilm_files, tmp_path):
    data = tmp_path / "held.txt"
    data.write_text("a held out sentence\nanother sentence to embed\nthe third one\n")
    result = CliRunner().invoke(main, ["eval", str(minilm_files["dynamo"]), str(artifact), "--data", str(data),
                                       "--tokenizer", "minilm", "--json"])
    assert result.exit_code == 0, result.output
    layers = json.loads(result.output)["layers"]
    assert len(layers) == 37
    measured = [layer for layer in layers if layer["output_transformed_by"] is None]
    assert all(layer["output_sqnr_db"] > 10 for layer in measured) and len(measured) >= 37 - 6
    assert {layer["output_transformed_by"] for layer in layers} - {None} <= {"scale/shift"}


def test_mixed_precision_artifact_reports_its_fallback_ranking(normalized_files, sentences, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(sentences) + "\n")
    folder = tmp_path / "mixed"
    result = CliRunner().invoke(main, [str(normalized_files("minilm")), "--passes", "w4a16(fallback=0.1)", "--backend",
                                       "ort", "--tokenizer", "minilm", "--calib", str(calib), "-o", str(folder),
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    _, manifest = open_artifact(folder)
    kept = [row["linear"] for row in manifest["sensitivity"] if row["preset"] == "w8a16"]
    assert kept and all(manifest["layers"][name]["preset"] == "w8a16" for name in kept)
    assert sum(layer["preset"] == "w4a16" for layer in manifest["layers"].values()) == 37 - len(kept)
    report = (folder / "report.md").read_text()
    assert "## Fallback ranking" in report and f"| {kept[0]} |" in report


class _BrokenBackend(Backend):
    """A backend with a bug: its lowering leaves two definitions of one value name."""

    name, summary = "broken", "duplicates a value name"

    def lower(self, model, ctx):
        lowered = SimulateBackend().lower(model, ctx)
        first = next(iter(model.graph))
        twin = ir.node("Identity", [first.inputs[0]], name="twin")
        twin.outputs[0].name = first.outputs[0].name
        model.graph.insert_before(first, twin)
        return lowered


def test_an_invalid_artifact_is_our_bug_and_nothing_is_written(tmp_path):
    from qcompiler.compiler import compile as run_compile
    from qcompiler.testing import model_from_text

    text = """
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[2, 4, 16] x) => (float[2, 4, 16] y) {
        h = Relu(x)
        y = MatMul(h, w)
    }
    """
    model = model_from_text(text, {"w": np.eye(16, dtype=np.float32)})
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 4, 16)).astype(np.float32)} for i in range(4)]
    with pytest.raises(QCompilerBug, match="qcompiler produced an invalid model in the broken lowering .*Duplicate"):
        run_compile(model, "w8a8", calib=feeds, normalize=False, backend=_BrokenBackend(), output=tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    # Weight-only without calibration: nothing ran the model before the staged artifact's validation.
    with pytest.raises(QCompilerBug, match="qcompiler produced an invalid artifact .*static assignment"):
        run_compile(model_from_text(text, {"w": np.eye(16, dtype=np.float32)}), "w4a16(group_size=16)",
                    normalize=False, backend=_BrokenBackend(), output=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as exit_:
        _guard(False, lambda: (_ for _ in ()).throw(QCompilerBug("qcompiler produced an invalid artifact (x)")))
    assert exit_.value.code == 1


def test_weights_left_in_the_sources_external_data_are_copied_into_the_artifact(normalized_files, tmp_path):
    """A source saved with external data, quantized: the embedding table no pass rewrote must come along."""
    from qcompiler.compiler import compile as run_compile
    from qcompiler.testing import zoo_calibration

    source = tmp_path / "source" / "model.onnx"
    source.parent.mkdir()
    ir.save(ir.load(normalized_files("llama")), source, external_data="weights.data")
    out = tmp_path / "out"
    run_compile(str(source), "w8a8", calib=zoo_calibration(ir.load(source)), output=out, backend="ort")
    path, manifest = open_artifact(out)
    (tmp_path / "source" / "weights.data").unlink()  # the artifact must not need the source's files
    model = ir.load(path)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    assert "model.onnx.data" in manifest["files"]
    from qcompiler.runtime import make_session

    make_session(model)
