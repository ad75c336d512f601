"""qcompile eval: fidelity metrics against the reference, on held-out sentences."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from qcompiler.calibration import data as calib_data
from qcompiler.cli import main
from qcompiler.evaluation import evaluate, neighbour_agreement, sentence_embeddings
from qcompiler.pass_manager import PassManager
from qcompiler.pipeline import parse_pipeline


def test_sentence_embeddings_ignore_padding():
    hidden = np.array([[[1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]])
    mask = np.array([[1, 1, 0]])
    np.testing.assert_allclose(sentence_embeddings(hidden, mask), [[2**-0.5, 2**-0.5]])


def test_neighbour_agreement_counts_changed_nearest_neighbours():
    reference = np.eye(4)[[0, 0, 1, 1]] + np.eye(4) * 0.1
    assert neighbour_agreement(reference, reference) == 1.0
    swapped = reference[[0, 2, 1, 3]]
    assert neighbour_agreement(reference, swapped) < 1.0


@pytest.fixture(scope="module")
def compiled(normalized_files, tmp_path_factory, tokenizer, sentences):
    model = ir.load(normalized_files("minilm"))
    calibration = calib_data.from_sentences(sentences, tokenizer, ["input_ids", "attention_mask", "token_type_ids"])
    PassManager(parse_pipeline("rotate,w8a8"), calibration=calibration, progress=False).run(model)
    path = tmp_path_factory.mktemp("eval") / "model.onnx"
    ir.save(model, path)
    return path


def test_evaluate_reports_outputs_embeddings_and_layers(normalized_files, compiled, tokenizer, heldout_sentences):
    heldout = calib_data.from_sentences(heldout_sentences, tokenizer, ["input_ids", "attention_mask", "token_type_ids"])
    result = evaluate(ir.load(normalized_files("minilm")), ir.load(compiled), heldout.batches)
    assert result.samples == len(heldout_sentences)
    assert 0.99 < result.embedding["mean_cosine"] < 1.0 and result.embedding["min_cosine"] > 0.98
    assert len(result.layers) == 37
    transformed = [layer for layer in result.layers if layer["output_sqnr_db"] is None]
    assert {layer["output_transformed_by"] for layer in transformed} == {"rotate"}
    assert len(transformed) == 6  # the value projections absorbed the per-head rotation
    measured = [layer for layer in result.layers if layer["output_sqnr_db"] is not None]
    assert all(15 < layer["output_sqnr_db"] < 60 and layer["weight_sqnr_db"] > 35 for layer in measured)


def test_eval_command(compiled, minilm_files, tmp_path):
    data = tmp_path / "held.txt"
    data.write_text("a held out sentence\nanother sentence to embed\nthe third one\n")
    runner = CliRunner()
    result = runner.invoke(main, ["eval", str(minilm_files["dynamo"]), str(compiled.parent), "--data", str(data),
                                  "--json"])
    assert result.exit_code == 0, result.output
    assert '"neighbour_agreement"' in result.output
    missing = runner.invoke(main, ["eval", "minilm", str(tmp_path), "--data", str(data)])
    assert missing.exit_code == 2 and "holds no model.onnx" in missing.output
