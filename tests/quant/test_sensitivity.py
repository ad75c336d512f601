"""Per-weight output sensitivity, checked against models rebuilt with the weight replaced."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.linears import constant_array, find_linears
from qcompiler.quant.sensitivity import output_sensitivity
from qcompiler.runtime import make_session
from qcompiler.testing import random_feeds


def _rebuilt_error(path, name: str, array: np.ndarray, batches) -> float:
    """The same figure the slow way: a second model with the initializer replaced."""
    reference, changed = ir.load(path), ir.load(path)
    changed.graph.initializers[name].const_value = ir.tensor(array.astype(np.float32))
    error = energy = 0.0
    for feeds in batches:
        expected = make_session(reference).run(None, feeds)
        got = make_session(changed).run(None, feeds)
        for e, g in zip(expected, got):
            error += float(np.sum(np.square(np.asarray(g, np.float64) - e)))
            energy += float(np.sum(np.square(np.asarray(e, np.float64))))
    return error / energy


def test_one_session_scores_each_weight_as_a_rebuilt_model_would(normalized_files):
    path = normalized_files("llama")
    model = ir.load(path)
    inputs_before = [v.name for v in model.graph.inputs]
    batches = random_feeds(model)
    rng = np.random.default_rng(0)
    linears = find_linears(model.graph)[:3]
    trials = {}
    for scale, linear in zip((0.01, 0.1, 1.0), linears):
        weight = constant_array(linear.weight)
        trials[linear.weight.name] = weight + scale * np.std(weight) * rng.standard_normal(weight.shape)
    scores = output_sensitivity(model, trials, batches)
    assert [v.name for v in model.graph.inputs] == inputs_before  # the overridable inputs are gone again
    for name, array in trials.items():
        assert np.isclose(scores[name], _rebuilt_error(path, name, array, batches), rtol=1e-4)
    assert 0 < scores[linears[0].weight.name] < scores[linears[2].weight.name]


def test_an_unchanged_weight_scores_zero(normalized_files):
    model = ir.load(normalized_files("gpt2"))
    linear = find_linears(model.graph)[0]
    scores = output_sensitivity(model, {linear.weight.name: constant_array(linear.weight)}, random_feeds(model))
    assert scores[linear.weight.name] == 0.0
