"""The engine: correct statistics through onnxruntime, caching by computation cone, blocks."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.linears import find_linears
from qcompiler.calibration.engine import CalibrationEngine
from qcompiler.pass_manager import PassManager
from qcompiler.pipeline import parse_pipeline
from qcompiler.runtime import make_session


def _normalized(model):
    PassManager(parse_pipeline("normalize"), verify=False, progress=False).run(model)
    return model


def test_statistics_match_the_activations_at_real_tokens(minilm, minilm_calibration):
    model = _normalized(minilm)
    linears = find_linears(model.graph)
    names = [linears[0].input.name, linears[4].input.name]
    engine = CalibrationEngine(minilm_calibration, progress=False)
    stats = engine.collect(model, names, xtx=[names[1]])
    session = make_session(model, names)
    rows = {n: [] for n in names}
    for feeds in minilm_calibration.batches:
        real = feeds["attention_mask"].astype(bool)
        assert not real.all(), "the batches are padded, so masking is exercised"
        for n, a in zip(names, session.run(names, feeds)):
            rows[n].append(a[real])
    for n in names:
        full = np.concatenate(rows[n])
        np.testing.assert_allclose(stats[n].absmax, np.abs(full).max(0), rtol=1e-6)
        assert stats[n].count == full.shape[0]
    full = np.concatenate(rows[names[1]]).astype(np.float64)
    np.testing.assert_allclose(stats[names[1]].xtx, full.T @ full, rtol=1e-4, atol=1e-2)


def test_cache_is_invalidated_only_by_changes_above_the_tensor(minilm, minilm_calibration):
    model = _normalized(minilm)
    linears = find_linears(model.graph)
    early, late = linears[0].input.name, linears[-2].input.name
    engine = CalibrationEngine(minilm_calibration, progress=False)
    first = engine.collect(model, [early, late])
    again = engine.collect(model, [early, late])
    assert engine.records[-1].cached == 2 and again[early] is first[early]

    # Rewrite a weight deep in the network: the early tensor's cone is untouched.
    weight = linears[-3].weight
    weight.const_value = ir.tensor(weight.const_value.numpy() * np.float32(2.0))
    third = engine.collect(model, [early, late])
    assert engine.records[-1].cached == 1
    assert third[early] is first[early] and third[late] is not first[late]


def test_small_memory_budget_splits_into_blocks_with_same_results(minilm, minilm_calibration):
    model = _normalized(minilm)
    names = list(dict.fromkeys(l.input.name for l in find_linears(model.graph)))[:6]
    whole = CalibrationEngine(minilm_calibration, progress=False).collect(model, names)
    small = CalibrationEngine(minilm_calibration, progress=False, memory_budget=1)
    plan = small.plan(model, names, set())
    assert len(plan.blocks) == len(names) and plan.peak_bytes > 0
    blocked = small.collect(model, names)
    for n in names:
        np.testing.assert_array_equal(whole[n].absmax, blocked[n].absmax)


def test_activation_sizes_computed_at_run_time_are_measured_not_guessed():
    """Regression: a CNN's spatial dims are symbolic after inference; guessing them split calibration into 40 passes."""
    from qcompiler.calibration.data import from_iterable
    from qcompiler.testing import model_from_text

    rng = np.random.default_rng(0)
    model = model_from_text("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N, 3, H, W] x) => (float[N, 16, P, Q] y) <float[16, 3, 3, 3] w, float[4] scales> {
            small = Resize <mode = "nearest"> (x, , scales)
            y = Conv <strides = [2, 2]> (small, w)
        }""", {"w": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
               "scales": np.array([1, 1, 0.1, 0.1], np.float32)})
    data = from_iterable([{"x": rng.standard_normal((4, 3, 200, 400)).astype(np.float32)}])
    plan = CalibrationEngine(data, progress=False).plan(model, ["small", "y"], set())
    assert not isinstance(next(v for n in model.graph for v in n.outputs if v.name == "y").shape[2], int)
    # 4 x 3 x 20 x 40 and 4 x 16 x 9 x 19 values, each held twice (onnxruntime's copy and ours).
    assert plan.batch_bytes == {"small": 4 * 3 * 20 * 40 * 8, "y": 4 * 16 * 9 * 19 * 8}
    assert not plan.unknown_dims and len(plan.blocks) == 1


def test_channels_first_statistics_and_whole_examples_of_a_conv_input():
    from qcompiler.calibration.data import from_iterable
    from qcompiler.testing import model_from_text

    rng = np.random.default_rng(0)
    model = model_from_text("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N, 3, 6, 6] x) => (float[N, 4, 4, 4] y) <float[4, 3, 3, 3] w> {
            y = Conv (x, w)
        }""", {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)})
    spread = np.array([1, 5, 20], np.float32).reshape(1, 3, 1, 1)
    batches = [{"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32) * spread}
               for _ in range(3)]
    engine = CalibrationEngine(from_iterable(batches), progress=False)
    by_channel = engine.collect(model, ["x"], channels_first=["x"])["x"]
    last_axis = engine.collect(model, ["x"])["x"]  # cached apart: a different reduction of the same tensor
    every = np.concatenate([b["x"] for b in batches]).astype(np.float32)
    np.testing.assert_allclose(by_channel.absmax, np.abs(every).max(axis=(0, 2, 3)), rtol=1e-6)
    assert last_axis.channels == 6 and by_channel.channels == 3
    examples = engine.examples(model, ["x"], 5)["x"]
    np.testing.assert_array_equal(examples, every[:5])


def test_memory_budgets_parse_binary_sizes_and_refuse_nonsense():
    import pytest

    from qcompiler.calibration.engine import parse_memory
    from qcompiler.errors import QCompilerError

    assert parse_memory("8G") == parse_memory("8GiB") == 8 * 2**30
    assert parse_memory("512m") == 512 * 2**20 and parse_memory("2147483648") == 2**31
    with pytest.raises(QCompilerError, match="not a size such as 512M"):
        parse_memory("lots")
    with pytest.raises(QCompilerError, match="below 1 MiB"):
        parse_memory("100K")
