"""The CPU schedules and fast math for the float ops: every function gets scheduled, results match numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.s_tir.schedule import ScheduleError

from qcompiler.backends.tvm import cpu_schedule
from qcompiler.backends.tvm.fast_math import fast_math
from qcompiler.backends.tvm.int4_matmul import default_target

ERF = np.vectorize(math.erf)


def attention_block(b: int, m: int, k: int, n: int) -> tvm.IRModule:
    """``softmax(Q K + mask)``, GELU of a transposed input, LayerNorm: the float ops around MiniLM's linears."""
    builder = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((b, m, k), "float32"))
    key = relax.Var("key", relax.TensorType((b, k, n), "float32"))
    mask = relax.Var("mask", relax.TensorType((1, m, n), "float32"))
    x = relax.Var("x", relax.TensorType((n, m), "float32"))
    gamma = relax.Var("gamma", relax.TensorType((n,), "float32"))
    with builder.function("main", [q, key, mask, x, gamma]):
        with builder.dataflow():
            scores = builder.emit(relax.op.add(relax.op.matmul(q, key), mask))
            probabilities = builder.emit(relax.op.nn.softmax(scores, axis=-1))
            activated = builder.emit(relax.op.nn.gelu(relax.op.permute_dims(x)))
            normed = builder.emit(relax.op.nn.layer_norm(activated, gamma, gamma, axes=[-1]))
            out = builder.emit_output(relax.Tuple([probabilities, normed]))
        builder.emit_func_output(out)
    return builder.get()


def reference(q, key, mask, x, gamma):
    scores = q @ key + mask
    e = np.exp(scores - scores.max(-1, keepdims=True))
    activated = 0.5 * x.T * (1 + ERF(x.T / np.sqrt(2)))
    mean, var = activated.mean(-1, keepdims=True), activated.var(-1, keepdims=True)
    return e / e.sum(-1, keepdims=True), (activated - mean) / np.sqrt(var + 1e-5) * gamma + gamma


@pytest.mark.parametrize("shape", [(12, 128, 32, 128), (3, 7, 33, 19), (1, 1, 5, 3)])
def test_scheduled_module_matches_numpy(shape):
    b, m, k, n = shape
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(b, m, k)), rng.normal(size=(b, k, n)), rng.normal(size=(1, m, n)),
              rng.normal(size=(n, m)), rng.uniform(0.5, 2, n)]
    inputs = [a.astype(np.float32) for a in inputs]
    target = default_target()
    executable = tvm.compile(attention_block(b, m, k, n), target, relax_pipeline=cpu_schedule.pipeline(target))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    for actual, expected in zip(got, reference(*inputs)):
        np.testing.assert_allclose(actual.numpy(), expected, rtol=2e-5, atol=2e-5)


def test_every_float_function_gets_a_schedule():
    """No function silently falls back to TVM's scalar default (the rules decline by returning None)."""
    target = default_target()
    with target:
        module = tvm.transform.Sequential([fast_math] + cpu_pipeline.legalize_passes(target)
                                          + [cpu_schedule.apply_schedules(target)])(attention_block(12, 128, 32, 128))
    functions = {var.name_hint: f for var, f in module.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert len(functions) >= 4  # the matmul with its mask, softmax, GELU of the transpose, LayerNorm
    unscheduled = [name for name, f in functions.items() if not f.attrs or "tirx.is_scheduled" not in f.attrs]
    assert not unscheduled
    script = "\n".join(f.script() for f in functions.values())
    assert "T.parallel" in script and "T.vectorized" in script
    assert 'scope="local"' in script  # the matmul accumulates in a register tile (the Matmul rule took it)
    assert "_rf" in script  # softmax and LayerNorm sum rows into vector lanes (the RowReduction rule took them)
    assert "erf(" not in script.replace("fast_erf", "")  # GELU's erf is the polynomial, not a libm call


def test_fast_gelu_matches_the_exact_one():
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4096,), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.nn.gelu(x))
        builder.emit_func_output(out)
    target = default_target()
    executable = tvm.compile(builder.get(), target, relax_pipeline=cpu_schedule.pipeline(target))
    values = np.linspace(-8, 8, 4096, dtype=np.float32)
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(values)).numpy()
    np.testing.assert_allclose(got, 0.5 * values * (1 + ERF(values / np.sqrt(2))), rtol=1e-6, atol=1e-6)


def test_a_rule_whose_primitive_fails_declines_and_the_next_rule_schedules():
    class Failing(cpu_schedule.Matmul):
        def apply(self, func, target, tunable):
            raise ScheduleError("this shape does not fit")

    target = default_target()
    with target:
        module = tvm.transform.Sequential([fast_math] + cpu_pipeline.legalize_passes(target))(attention_block(2, 8, 4, 8))
    (matmul,) = [f for var, f in module.functions_items() if "matmul" in var.name_hint]
    assert cpu_schedule._Declining(Failing()).apply(matmul, target, False) is None
    assert cpu_schedule._Declining(cpu_schedule.Matmul()).apply(matmul, target, False) is not None


def test_a_matmul_over_one_element_is_not_scheduled_as_elementwise():
    """``(x S) R + y`` with one column in ``S`` (LLM.int8() with one outlier channel): the K = 1 matmul
    normalizes to spatial iterators but keeps its reduction init; the Elementwise rule once flattened it wrong."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8, 40, 384), "float32"))
    y = relax.Var("y", relax.TensorType((8, 40, 384), "float32"))
    rng = np.random.default_rng(0)
    select = np.zeros((384, 1), np.float32)
    select[7, 0] = 1.0
    rows = rng.normal(size=(1, 384)).astype(np.float32)
    with builder.function("main", [x, y]):
        with builder.dataflow():
            picked = builder.emit(relax.op.matmul(x, relax.const(select)))
            out = builder.emit_output(relax.op.add(y, relax.op.matmul(picked, relax.const(rows))))
        builder.emit_func_output(out)
    target = default_target()
    executable = tvm.compile(builder.get(), target, relax_pipeline=cpu_schedule.pipeline(target))
    inputs = [rng.normal(size=(8, 40, 384)).astype(np.float32) for _ in range(2)]
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()
    np.testing.assert_allclose(got, inputs[1] + inputs[0][..., 7:8] * rows, rtol=1e-5, atol=1e-5)
