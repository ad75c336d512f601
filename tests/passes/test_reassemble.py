"""reassemble: QLLM's channel splits are exact, its merges approximate, and the search lowers the quantized error.

With ``assemble=false`` the pass declares itself function-preserving, so the pass manager
checks it on held-out batches (relative output error 1e-4); with merges it records the
change instead, and the tests bound it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.passes.reassemble import build_map, merge_order, quantized_error, search_map, split_counts
from qcompiler.pass_manager import PassManager
from qcompiler.pipeline import parse_pipeline
from qcompiler.quant.presets import PRESETS
from qcompiler.testing import zoo_calibration
from qcompiler.verify import worst
from tests.passes.test_transforms import TOLERANCE, run

SPLIT = "reassemble(rows=64)"


def outlier_rows(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((256, 32))
    x[:, [5, 20]] *= 30
    return x, rng.standard_normal((32, 16))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bert", "vit"])
def test_splits_preserve_the_function_on_tiny_architectures(normalized_files, arch):
    model = ir.load(normalized_files(arch))
    (record,) = run(model, SPLIT, zoo_calibration(model))
    transformed = record.details["transformed"]
    assert record.modified and transformed, record.details
    assert all(e["channels_after"] > e["channels"] and e["merged"] == 0 for e in transformed.values())
    assert sum(n.op_type == "Concat" and "_reassemble_" in n.name for n in model.graph) == len(transformed)
    assert record.details["added_macs_share"] > 0


def test_merges_keep_the_channel_count_and_report_their_error(normalized_files):
    model = ir.load(normalized_files("llama"))
    report = PassManager(parse_pipeline("reassemble(assemble=true,rows=64),w8a8"), calibration=zoo_calibration(model),
                         tolerance=TOLERANCE, progress=False).run(model)
    record = report.passes[0]
    assert not record.preserves_function
    transformed = record.details["transformed"]
    assert transformed and all(e["channels_after"] == e["channels"] for e in transformed.values())
    assert all(e["loss"]["reassembled"] < e["loss"]["none"] for e in transformed.values())
    merged = [e for e in transformed.values() if e["merged"]]
    assert merged and all(0 < e["merge_error"] < 0.1 for e in merged)
    assert worst(record.verification)[1]["cosine"] > 0.99


def test_minilm_splits_lower_the_w8a8_error(normalized_files, tokenizer):
    from qcompiler.calibration import data as calib_data
    from qcompiler.calibration.resolve import builtin_sentences

    calibration = calib_data.from_sentences(builtin_sentences("calibration")[:32], tokenizer,
                                            ["input_ids", "attention_mask", "token_type_ids"], batch_size=8)
    model = ir.load(normalized_files("minilm"))
    report = PassManager(parse_pipeline("reassemble(rows=256),w8a8"), calibration=calibration,
                         tolerance=TOLERANCE, progress=False).run(model)
    record = report.passes[0]
    assert worst(record.verification)[1]["relative_error"] < TOLERANCE
    transformed = record.details["transformed"]
    assert len(transformed) >= 12  # at least the two LayerNorm outputs of each of the 6 layers
    assert all(e["channels_after"] <= e["channels"] * 1.125 for e in transformed.values())


def test_split_map_is_exact_and_shrinks_the_range():
    x, w = outlier_rows()
    counts = split_counts(np.abs(x).max(axis=0), theta=float(np.sort(np.abs(x).max(axis=0))[-3]), block=1)
    mapping = build_map(counts, 0, np.empty((0, 2), int), theta=0.0)
    np.testing.assert_allclose(mapping.activation(x) @ mapping.weight(w), x @ w, rtol=1e-10, atol=1e-9)
    assert np.abs(mapping.activation(x)).max() < np.abs(x).max() / 2
    assert mapping.splits == 2 and len(mapping.first) == counts.sum() > 32


def test_split_counts_fill_the_group_size():
    maxima = np.array([40.0, 3.0, 2.0, 1.0] + [1.0] * 12)
    counts = split_counts(maxima, theta=3.0, block=8)
    assert counts.sum() % 8 == 0 and counts[0] >= 14  # the largest channel takes the filling splits


def test_merging_identical_channels_is_exact():
    x, w = outlier_rows()
    x[:, 9] = x[:, 2]
    w[9] = w[2]
    (a, b), *_ = merge_order(x, w)
    assert {int(a), int(b)} == {2, 9}
    mapping = build_map(np.ones(32, int), 1, merge_order(x, w), theta=0.0)
    assert len(mapping.first) == 31
    np.testing.assert_allclose(mapping.activation(x) @ mapping.weight(w), x @ w, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("assemble", [False, True])
def test_search_beats_no_map_on_outliers(assemble):
    x, w = outlier_rows()
    if assemble:  # channels 16.. nearly repeat 0..15, so merges cost little
        rng = np.random.default_rng(1)
        x[:, 21:] = x[:, 5:16] + 0.01 * rng.standard_normal((256, 11))
        w[21:] = w[5:16] + 0.01 * rng.standard_normal((11, 16))
    scheme = PRESETS["w8a8"][0]
    mapping, error, none = search_map(x, [w], scheme, assemble, growth=0.5)
    assert mapping is not None and error < none / 2
    assert error == pytest.approx(quantized_error(x, [w], mapping, scheme))
    assert (len(mapping.first) == 32) == assemble


def test_splits_that_would_fill_whole_weight_groups_beyond_growth_are_refused(normalized_files):
    model = ir.load(normalized_files("llama"))
    report = PassManager(parse_pipeline("reassemble(rows=64),w4a16"), calibration=zoo_calibration(model),
                         tolerance=TOLERANCE, progress=False).run(model)
    record = report.passes[0]
    assert not record.modified and record.details["skipped"]
    assert all("whole group of 128 channels" in reason for reason in record.details["skipped"].values())
