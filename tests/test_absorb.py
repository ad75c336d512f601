"""`qcompiler.absorb`, the algebra fold-norm, smooth, shift and rotate share, on graphs of a few nodes.

Each rewrite is checked twice: numerically (the model still computes what it did, or
exactly what the algebra says it now computes) and on the parameters themselves
(``gamma / s``, ``b + z W``, ...), so a rewrite that preserved the function by doing
nothing fails as surely as one that broke it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.absorb import (OUTPUT_TRANSFORMED, absorb_affine, ensure_bias, rewrite_constant, sink_rows,
                              transform_sinks)
from qcompiler.analysis.linears import constant_array, find_linears
from qcompiler.analysis.regions import find_regions
from qcompiler.testing import assert_function_preserved, model_from_text

HEADER = '<ir_version: 10, opset_import: ["" : 18]>\n'

# LayerNorm (with or without beta) read by two sinks, one with a bias and one without.
NORM_TWO_SINKS = HEADER + """
norm_two_sinks (float[N, T, 8] x) => (float[N, T, 4] q, float[N, T, 6] k) {
    h = LayerNormalization <axis = -1> (x, gamma{beta})
    q_mm = MatMul (h, wq)
    q = Add (q_mm, bq)
    k = MatMul (h, wk)
}
"""
# A linear producer (MatMul + Add, or a bare MatMul) read by one sink.
LINEAR_CHAIN = HEADER + """
linear_chain (float[N, 8] x) => (float[N, 5] y) {
    {producer}
    y_mm = MatMul (p, ws)
    y = Add (y_mm, bs)
}
"""
# The LayerNorm output is also read outside the region: by a residual Add and as a graph output.
FOREIGN_READERS = HEADER + """
foreign_readers (float[N, T, 8] x) => (float[N, T, 4] y, float[N, T, 8] r, float[N, T, 8] h) {
    h = LayerNormalization <axis = -1> (x, gamma, beta)
    y = MatMul (h, w)
    r = Add (h, x)
}
"""
# Two regions whose producers share gamma and beta and whose sinks share one weight (tied parameters).
TIED = HEADER + """
tied (float[N, 8] a, float[N, 8] b) => (float[N, 4] ya, float[N, 4] yb) {
    ha = LayerNormalization <axis = -1> (a, gamma, beta)
    hb = LayerNormalization <axis = -1> (b, gamma, beta)
    ya = MatMul (ha, w)
    yb = MatMul (hb, w)
}
"""
# Sinks reading a graph input: one with a bias, one without, one through a channel permutation.
BARE_SINKS = HEADER + """
bare_sinks (float[N, 8] x) => (float[N, 4] y1, float[N, 3] y2, float[N, 5] y3) {
    {prefix}
    y1_mm = MatMul ({input}, w1)
    y1 = Add (y1_mm, b1)
    y2 = MatMul ({input}, w2)
    grouped = Reshape ({input}, split_shape)
    swapped = Transpose <perm = [0, 2, 1]> (grouped)
    permuted = Reshape (swapped, flat_shape)
    y3 = MatMul (permuted, w3)
}
"""


def rng_arrays(seed: int, **shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A float32 normal array per name, of the given shape."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def feeds(model: ir.Model, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Two batches for every float input, with channels of very different offsets and ranges, as real ones have."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(2):
        batch = {}
        for value in model.graph.inputs:
            dims = [d if isinstance(d, int) else 3 for d in value.shape]
            channels = dims[-1]
            batch[value.name] = (rng.standard_normal(dims) * rng.uniform(0.5, 5, channels)
                                 + rng.uniform(-3, 3, channels)).astype(np.float32)
        batches.append(batch)
    return batches


def node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def const(model: ir.Model, name: str, index: int) -> np.ndarray:
    """Input ``index`` of node ``name``, a constant."""
    return constant_array(node(model, name).inputs[index])


def scale_and_shift(channels: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A scale far from 1 in every channel and a shift far from 0, so every parameter they touch must move."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(2.0, 8.0, channels) ** rng.choice([-1, 1], channels)
    shift = rng.uniform(1.0, 4.0, channels) * rng.choice([-1, 1], channels)
    return scale, shift


def norm_model(beta: bool = True) -> ir.Model:
    weights = rng_arrays(0, gamma=(8,), beta=(8,), wq=(8, 4), bq=(4,), wk=(8, 6))
    if not beta:
        del weights["beta"]
    return model_from_text(NORM_TWO_SINKS.replace("{beta}", ", beta" if beta else ""), weights)


# ---------------------------------------------------------------- rewrite_constant


def test_rewrite_constant_changes_a_private_constant_in_place():
    model = norm_model()
    norm = node(model, "h")
    gamma = norm.inputs[1]
    before = constant_array(gamma).copy()
    notes: list[str] = []
    rewrite_constant(model.graph, norm, 1, lambda g: g * 3 + 1, notes)
    assert norm.inputs[1] is gamma and len(model.graph.initializers) == 5
    np.testing.assert_allclose(constant_array(gamma), before * 3 + 1, rtol=1e-6)
    assert notes == []


def test_rewrite_constant_duplicates_a_shared_constant_and_says_so():
    model = model_from_text(TIED, rng_arrays(0, gamma=(8,), beta=(8,), w=(8, 4)))
    shared = node(model, "ya").inputs[1]
    original = constant_array(shared).copy()
    notes: list[str] = []
    rewrite_constant(model.graph, node(model, "ya"), 1, lambda w: -2 * w, notes)
    copy = node(model, "ya").inputs[1]
    assert copy is not shared and node(model, "yb").inputs[1] is shared
    np.testing.assert_allclose(constant_array(copy), -2 * original, rtol=1e-6)
    np.testing.assert_array_equal(constant_array(shared), original)
    assert len(notes) == 1 and "'w'" in notes[0] and "duplicated" in notes[0]
    # The other reader now owns the original alone: its rewrite is in place, with no note.
    rewrite_constant(model.graph, node(model, "yb"), 1, lambda w: w / 4, notes)
    assert node(model, "yb").inputs[1] is shared and len(notes) == 1
    np.testing.assert_allclose(constant_array(shared), original / 4, rtol=1e-6)


def test_rewrite_constant_refuses_an_activation():
    model = norm_model()
    with pytest.raises(ValueError, match="not a constant"):
        rewrite_constant(model.graph, node(model, "h"), 0, lambda x: x, [])


# ---------------------------------------------------------------- ensure_bias


def test_ensure_bias_adds_a_zero_bias_that_later_rewrites_find():
    text = HEADER + """
    needs_bias (float[N, 8] x) => (float[N, 4] y, float[N, 4] r) {
        m = MatMul (x, w1)
        r = Relu (m)
        y = MatMul (x, w2)
    }
    """
    weights = rng_arrays(0, w1=(8, 4), w2=(8, 4))
    before, after = model_from_text(text, weights), model_from_text(text, weights)
    graph = after.graph
    for linear in find_linears(graph):
        assert linear.bias_add is None
        biased = ensure_bias(graph, linear, np.dtype(np.float32))
        assert biased.bias_add is not None and biased.matmul is linear.matmul
        np.testing.assert_array_equal(constant_array(biased.bias), np.zeros(4, np.float32))
        assert ensure_bias(graph, biased, np.dtype(np.float32)) is biased  # a bias is never added twice
    assert all(linear.bias_add is not None for linear in find_linears(graph))
    # The Relu reads the Add under the old name; the graph output y is the Add, still called y.
    relu = node(after, "r")
    assert relu.inputs[0].producer().op_type == "Add" and relu.inputs[0].name == "m"
    assert [v.name for v in graph.outputs] == ["y", "r"] and graph.outputs[0].producer().op_type == "Add"
    assert_function_preserved(before, after, feeds(before), rtol=0.0)


# ---------------------------------------------------------------- transform_sinks


def bare_sinks(prefix: str = "", input_name: str = "x", **extra: np.ndarray) -> ir.Model:
    weights = rng_arrays(2, w1=(8, 4), b1=(4,), w2=(8, 3), w3=(8, 5))
    weights.update(split_shape=np.array([-1, 2, 4]), flat_shape=np.array([-1, 8]), **extra)
    return model_from_text(BARE_SINKS.replace("{prefix}", prefix).replace("{input}", input_name), weights)


def test_transform_sinks_rewrites_rows_and_biases_through_each_sinks_channel_map():
    """Sinks that get ``W' = diag(s) W`` and ``b' = b + z W`` compute on ``x`` what they computed on ``x s + z``."""
    s, z = scale_and_shift(8)
    after = bare_sinks()
    (region,) = find_regions(after.graph).regions
    permuted = next(sink for sink in region.sinks if sink.linear.name == "y3")
    assert not np.array_equal(permuted.channel_map, np.arange(8))  # the Transpose moved channels
    w1, w3 = const(after, "y1_mm", 1).astype(np.float64), const(after, "y3", 1).astype(np.float64)
    b1 = const(after, "y1", 1).astype(np.float64)
    transform_sinks(after.graph, region, lambda sink, w: w * sink_rows(sink, s)[:, None], z, [])

    np.testing.assert_allclose(const(after, "y1_mm", 1), s[:, None] * w1, rtol=1e-6)
    np.testing.assert_allclose(const(after, "y1", 1), b1 + z @ w1, rtol=1e-5)
    np.testing.assert_allclose(const(after, "y3", 1), s[permuted.channel_map, None] * w3, rtol=1e-6)
    assert all(sink.linear.bias_add is not None for sink in region.sinks)  # the region sees the new biases
    prefix = "scaled = Mul (x, s)\n    shifted = Add (scaled, z)"
    reference = bare_sinks(prefix, "shifted", s=s.astype(np.float32), z=z.astype(np.float32))
    assert_function_preserved(reference, after, feeds(after), rtol=1e-5)


def test_transform_sinks_without_a_shift_adds_no_bias():
    after = bare_sinks()
    (region,) = find_regions(after.graph).regions
    w2 = const(after, "y2", 1)
    transform_sinks(after.graph, region, lambda sink, w: 2 * w, None, [])
    np.testing.assert_allclose(const(after, "y2", 1), 2 * w2, rtol=1e-6)
    assert node(after, "y2").op_type == "MatMul" and after.graph.outputs[1].producer() is node(after, "y2")


# ---------------------------------------------------------------- absorb_affine


@pytest.mark.parametrize("parts", ["scale", "shift", "scale+shift"])
def test_absorb_affine_into_a_layernorm(parts):
    s, z = scale_and_shift(8)
    scale = s if "scale" in parts else None
    shift = z if "shift" in parts else None
    before, after = norm_model(), norm_model()
    gamma, beta = const(before, "h", 1).astype(np.float64), const(before, "h", 2).astype(np.float64)
    wq, bq, wk = (const(before, n, 1).astype(np.float64) for n in ("q_mm", "q", "k"))
    (region,) = find_regions(after.graph).of_kind("layernorm")
    notes: list[str] = []
    absorb_affine(after.graph, region, scale, shift, notes)

    s_or_1 = s if scale is not None else np.ones(8)
    z_or_0 = z if shift is not None else np.zeros(8)
    np.testing.assert_allclose(const(after, "h", 1), gamma / s_or_1, rtol=1e-6)
    np.testing.assert_allclose(const(after, "h", 2), (beta - z_or_0) / s_or_1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(const(after, "q_mm", 1), s_or_1[:, None] * wq, rtol=1e-6)
    np.testing.assert_allclose(const(after, "q", 1), bq + z_or_0 @ wq, rtol=1e-5, atol=1e-6)
    (k,) = (l for l in find_linears(after.graph) if l.matmul.name == "k")
    np.testing.assert_allclose(constant_array(k.weight), s_or_1[:, None] * wk, rtol=1e-6)
    assert (k.bias is not None) == (shift is not None)  # a zero bias is created only when a shift needs one
    if shift is not None:
        np.testing.assert_allclose(constant_array(k.bias), z @ wk, rtol=1e-5)
    assert notes == []  # nothing was shared
    assert_function_preserved(before, after, feeds(before), rtol=1e-5)


def test_a_shift_gives_a_layernorm_without_beta_one():
    s, z = scale_and_shift(8)
    before, after = norm_model(beta=False), norm_model(beta=False)
    (region,) = find_regions(after.graph).of_kind("layernorm")
    absorb_affine(after.graph, region, s, z, [])
    np.testing.assert_allclose(const(after, "h", 2), -z / s, rtol=1e-6)
    assert_function_preserved(before, after, feeds(before), rtol=1e-5)


@pytest.mark.parametrize("producer_bias", [True, False])
def test_absorb_affine_into_a_linear_producer(producer_bias):
    s, z = scale_and_shift(6)
    producer = "p_mm = MatMul (x, wp)\n    p = Add (p_mm, bp)" if producer_bias else "p = MatMul (x, wp)"
    text = LINEAR_CHAIN.replace("{producer}", producer)
    weights = rng_arrays(3, wp=(8, 6), bp=(6,), ws=(6, 5), bs=(5,))
    if not producer_bias:
        del weights["bp"]
    before, after = model_from_text(text, weights), model_from_text(text, weights)
    (region,) = find_regions(after.graph).of_kind("linear")
    absorber = region.absorber.matmul
    wp, ws, bs = weights["wp"].astype(np.float64), weights["ws"].astype(np.float64), weights["bs"].astype(np.float64)
    bp = weights["bp"].astype(np.float64) if producer_bias else np.zeros(6)
    absorb_affine(after.graph, region, s, z, [])

    np.testing.assert_allclose(constant_array(absorber.inputs[1]), wp / s[None, :], rtol=1e-6)
    (producer,) = (l for l in find_linears(after.graph) if l.matmul is absorber)
    np.testing.assert_allclose(constant_array(producer.bias), (bp - z) / s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(const(after, "y_mm", 1), s[:, None] * ws, rtol=1e-6)
    np.testing.assert_allclose(const(after, "y", 1), bs + z @ ws, rtol=1e-5)
    assert absorber.metadata_props[OUTPUT_TRANSFORMED] == "scale/shift"  # per-layer comparisons skip it
    assert_function_preserved(before, after, feeds(before), rtol=1e-5)


@pytest.mark.parametrize("parts", ["scale", "shift", "scale+shift"])
def test_foreign_readers_get_the_untransformed_value_back(parts):
    s, z = scale_and_shift(8)
    scale = s if "scale" in parts else None
    shift = z if "shift" in parts else None
    weights = rng_arrays(4, gamma=(8,), beta=(8,), w=(8, 4))
    before, after = model_from_text(FOREIGN_READERS, weights), model_from_text(FOREIGN_READERS, weights)
    (region,) = find_regions(after.graph).of_kind("layernorm")
    assert len(region.foreign) == 2  # the residual Add and the graph output
    absorb_affine(after.graph, region, scale, shift, [])

    # x' feeds the sink and a compensating x' * s (Mul) and/or + z (Add) chain, which feeds the outside readers.
    expected = [op for op, part in (("Mul", scale), ("Add", shift)) if part is not None]
    value = node(after, "h").outputs[0]
    assert sorted(use.node.op_type for use in value.uses()) == sorted(["MatMul", expected[0]])
    for op in expected:
        (step,) = (use.node for use in value.uses() if use.node.op_type == op)
        value = step.outputs[0]
    assert node(after, "r").inputs[0] is value and after.graph.outputs[2] is value and value.name == "h"
    assert region.foreign == []
    np.testing.assert_allclose(const(after, "h", 1), weights["gamma"] / (s if scale is not None else 1), rtol=1e-6)
    assert_function_preserved(before, after, feeds(before), rtol=1e-5)


def test_tied_parameters_are_duplicated_and_the_other_region_keeps_the_originals():
    s, z = scale_and_shift(8)
    weights = rng_arrays(5, gamma=(8,), beta=(8,), w=(8, 4))
    before, after = model_from_text(TIED, weights), model_from_text(TIED, weights)
    regions = {r.name: r for r in find_regions(after.graph).of_kind("layernorm")}
    notes: list[str] = []
    absorb_affine(after.graph, regions["ha"], s, z, notes)

    assert sorted(n.split("'")[1] for n in notes) == ["beta", "gamma", "w"]
    np.testing.assert_allclose(const(after, "ha", 1), weights["gamma"] / s, rtol=1e-6)
    np.testing.assert_allclose(const(after, "ya", 1), s[:, None] * weights["w"], rtol=1e-6)
    for name, index, original in (("hb", 1, "gamma"), ("hb", 2, "beta"), ("yb", 1, "w")):
        assert node(after, name).inputs[index].name == original
        np.testing.assert_array_equal(const(after, name, index), weights[original])
    assert_function_preserved(before, after, feeds(before), rtol=1e-5)
