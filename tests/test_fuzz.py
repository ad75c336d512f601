"""Fuzzing: random graphs over the supported op vocabulary through every function-preserving pass and every preset.

Graphs come from `tests.strategies` (transformer blocks and CNNs as exporters spell
them, opsets 11-23, symbolic batch and sequence). For each, a function-preserving
pipeline must keep the outputs within the pass tolerance on inputs it never saw, and a
preset on the simulate or ort backend must give an artifact that runs with finite
outputs, or refuse in one sentence; an internal error is always a failure. The budget
here is fixed-seed and small; ``benchmarks/fuzz.py`` runs the same checks long, and on
the TVM backend too (``--tvm``), whose builds are too slow to fuzz here.

Each bug the fuzzer found became a regression test on the smallest graph that shows it:
here for the TVM builds, beside the code they test for the others
(`tests/passes/test_normalize.py`, `tests/passes/test_quantize.py`). One is still open and
pinned by a strict expected failure, which flips when it is fixed.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcompiler.backends.tvm.int8_matmul import has_vnni
from tests.strategies import (BACKENDS, PRESERVING, PRESETS, BlockPlan, FuzzCase, Outcome, check_preserving,
                              check_preset, fuzz_cases, refusal_problem, transformer_case)

# No shrinking: an example takes about a second and shrinking one takes minutes, while the
# failure message's plan and seed rebuild the graph exactly (benchmarks/fuzz.py --save shrinks).
FUZZ = settings(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

@pytest.fixture(autouse=True)
def _quiet_converter():
    """onnxscript's version converter logs a warning for every model below opset 18."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def assert_no_failure(case: FuzzCase, outcome: Outcome) -> None:
    """A failure names the pipeline, the backend, what went wrong and the plan and seed that rebuild the graph."""
    if outcome.status == "failed":
        raise AssertionError(f"{outcome.pipeline} on {outcome.backend}: {outcome.message}\n{case.description}")


@settings(FUZZ, max_examples=20)
@given(case=fuzz_cases(), pipeline=st.sampled_from(PRESERVING))
def test_function_preserving_passes_keep_the_function(case, pipeline):
    assert_no_failure(case, check_preserving(case, pipeline))


@settings(FUZZ, max_examples=25)
@given(case=fuzz_cases(), preset=st.sampled_from(PRESETS), backend=st.sampled_from(BACKENDS))
def test_presets_give_a_runnable_artifact_or_one_sentence(case, preset, backend):
    assert_no_failure(case, check_preset(case, preset, backend))


# ------------------------------------------------------------------ the oracle itself


@pytest.mark.parametrize("message", [
    "Preset 'w8a8' found no linear layer to quantize (a MatMul or Gemm with a constant 2-D weight).",
    "Input 'x' has rank 3, but the shape given is (1, 128).",
])
def test_a_one_sentence_refusal_passes(message):
    assert refusal_problem(message) is None


@pytest.mark.parametrize("message", [
    "",
    "Could not convert the model.\nTraceback (most recent call last):",
    "Could not convert the model: cannot reshape array of size 12 into shape (5,)",
    "The weight is not constant. Give it as an initializer.",
    "onnxruntime cannot run this model: [ONNXRuntimeError] : 1 : FAIL : Load model failed",
])
def test_a_message_that_is_not_one_sentence_fails(message):
    assert refusal_problem(message) is not None


SMALL = BlockPlan(opset=23, hidden=16, ffn=32, heads=2, layers=1, pre_norm=True, norm="rmsnorm", activation="silu",
                  gated=True, linear_form="matmul", bias=False, attention=True, attention_weights="separate",
                  share_layers=False, tied_mlp=False, input_projection=16, tied_head=False, final_norm=True,
                  outliers=2, gamma="positive", gemm_scaled=False, noise=False, attention_bias=False, aux_output=None,
                  dynamic_shapes=False, constant_nodes=False, batch="batch", seq="seq")


def test_the_oracle_sees_a_pipeline_that_changes_the_function():
    """A quantize preset run as if it preserved the function must be reported as an equivalence violation."""
    outcome = check_preserving(transformer_case(SMALL), "w4a4")
    assert outcome.status == "failed" and "equivalence violation" in outcome.message, outcome


def test_the_oracle_passes_a_correct_pipeline():
    assert check_preserving(transformer_case(SMALL), "rotate").status == "ok"
    assert check_preset(transformer_case(SMALL), "w8a8", "ort").status == "ok"


# ------------------------------------------------------------------ regression tests of bugs the fuzzer found


def tiny_case(nodes: list[onnx.NodeProto], outputs: list[str], weights: dict[str, tuple[int, ...]],
              dims: list[int | str]) -> FuzzCase:
    """A float model from input ``x`` of ``dims`` to ``outputs`` (all of ``dims``), with random ``weights``."""
    rng = np.random.default_rng(0)
    initializers = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
                    for name, shape in weights.items()]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)  # noqa: E731
    graph = helper.make_graph(nodes, "g", [value("x")], [value(name) for name in outputs], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)
    onnx.checker.check_model(model, full_check=True)
    return FuzzCase(model, onnx.printer.to_text(model.graph), {"x": dims})


def test_tvm_builds_rmsnorm_into_a_linear_for_a_batch():
    nodes = [helper.make_node("RMSNormalization", ["x", "g"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "w"], ["y"])]
    outcome = check_preset(tiny_case(nodes, ["y"], {"g": (16,), "w": (16, 16)}, [2, 5, 16]), "w4a16", "tvm")
    assert outcome.status == "ok", outcome


def attention_heads(heads: int, head_dim: int) -> list[onnx.NodeProto]:
    """q/k/v MatMuls on ``x``, split into heads, softmax attention, heads merged, o-proj into ``y``."""
    make = helper.make_node
    nodes = [make("MatMul", ["x", f"w{n}"], [n]) for n in "qkv"]
    nodes += [make("Reshape", [n, "split"], [f"{n}_heads"]) for n in "qkv"]
    nodes += [make("Transpose", ["q_heads"], ["qt"], perm=[0, 2, 1, 3]),
              make("Transpose", ["k_heads"], ["kt"], perm=[0, 2, 3, 1]),
              make("Transpose", ["v_heads"], ["vt"], perm=[0, 2, 1, 3]),
              make("MatMul", ["qt", "kt"], ["scores"]), make("Softmax", ["scores"], ["p"], axis=-1),
              make("MatMul", ["p", "vt"], ["context"]), make("Transpose", ["context"], ["ct"], perm=[0, 2, 1, 3]),
              make("Reshape", ["ct", "merge"], ["merged"]), make("MatMul", ["merged", "wo"], ["y"])]
    constants = {"split": [0, 0, heads, head_dim], "merge": [0, 0, heads * head_dim]}
    return [make("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.int64)))
            for name, v in constants.items()] + nodes


def test_tvm_builds_attention_for_one_token():
    weights = {f"w{n}": (16, 16) for n in "qkvo"}
    outcome = check_preset(tiny_case(attention_heads(2, 8), ["y"], weights, [1, 1, 16]), "w4a16", "tvm")
    assert outcome.status == "ok", outcome


@pytest.mark.xfail(not has_vnni(), strict=True, raises=AssertionError,
                   reason="without AVX-512 VNNI the TVM backend's fallback int8 path cannot build one library for two "
                          "batch sizes of a w8a8-dyn linear on 2-D input (tvm InternalError: Check failed: same_as(var))")
def test_tvm_builds_dynamic_w8a8_on_2d_input_for_two_batch_sizes():
    """A CNN's classifier head; check_preset builds for batch 3 and batch 1."""
    case = tiny_case([helper.make_node("MatMul", ["x", "w"], ["y"])], ["y"], {"w": (16, 16)}, ["batch", 16])
    outcome = check_preset(case, "w8a8-dyn", "tvm")
    assert outcome.status == "ok", outcome


@pytest.mark.xfail(strict=True, reason="float32 rounding of affine's five online transforms adds up to 1.5e-4 (cosine "
                   "1.000000), above the 1e-4 pass tolerance; no algebra error, no fix yet")
def test_affine_on_an_input_projection_and_its_post_norm_stream_stays_within_tolerance():
    """Found by benchmarks/fuzz.py (seed 7). Measured per online transform: each alone 2e-6 to 8e-5, x and add_3
    together 1.5e-4; with add_3's scale forced to 1 it is 4.9e-5, with its factors the identity 8.2e-5: every piece
    adds rounding, none is wrong. rotate on the same graph: 4.5e-5."""
    plan = BlockPlan(opset=11, hidden=8, ffn=8, heads=4, layers=1, pre_norm=False, norm="rmsnorm-div",
                     activation="relu", gated=False, linear_form="matmul", bias=True, attention=True,
                     attention_weights="shared-qk", share_layers=True, tied_mlp=True, input_projection=64,
                     tied_head=False, final_norm=True, outliers=3, gamma="zero", gemm_scaled=False, noise=True,
                     attention_bias=True, aux_output=None, dynamic_shapes=True, constant_nodes=True, batch="batch",
                     seq="seq")
    outcome = check_preserving(transformer_case(plan, seed=2798993), "affine(steps=2,rows=64)")
    assert outcome.status == "ok", outcome
