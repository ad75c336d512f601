"""The online Hadamard node: its ONNX body, and the regrouping of its factors for dense runtimes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.hadamard import is_sylvester, orthogonal_matrix
from qcompiler.online_rotation import DOMAIN, OP, balance_factors, balance_rotations, factor_pair, rotate_last_axis
from qcompiler.pass_manager import PassManager
from qcompiler.pipeline import parse_pipeline
from qcompiler.runtime import make_session, run_batches

# Width -> the balanced factor sizes (a, b): MiniLM, BERT-base, Qwen2-1.5B, Llama-2-7B MLP, powers of two,
# and a plan with a random factor (only the Sylvester part moves).
BALANCED = {384: (16, 24), 768: (32, 24), 1536: (32, 48), 3584: (64, 56), 4096: (64, 64), 11008: (32, 344),
            13696: (128, 107), 12: (1, 12), 214: (2, 107)}


@pytest.mark.parametrize("n", list(BALANCED))
def test_balanced_factors_are_the_same_rotation(n: int) -> None:
    a, b = factor_pair(n)
    new_a, new_b = balance_factors(a, b)
    assert (new_a.shape[0], new_b.shape[0]) == BALANCED[n]
    assert new_a.shape[0] + new_b.shape[0] <= a.shape[0] + b.shape[0]
    x = np.random.default_rng(n).standard_normal((3, n))
    np.testing.assert_allclose(rotate_last_axis(x, new_a, new_b), rotate_last_axis(x, a, b), rtol=0, atol=1e-12)
    if n <= 1536:
        np.testing.assert_allclose(np.kron(new_a, new_b), orthogonal_matrix(n), rtol=0, atol=1e-12)


def test_only_a_sylvester_first_factor_is_split() -> None:
    assert is_sylvester(factor_pair(1536)[0]) and not is_sylvester(factor_pair(1536)[1])
    a, b = factor_pair(12)  # A is the 1 x 1 identity: nothing to move
    assert balance_factors(a, b)[0] is a
    random_first = orthogonal_matrix(8, kind="random", seed=1)
    assert balance_factors(random_first, b)[0] is random_first


def rotated_minilm(normalized_files, calibration) -> ir.Model:
    model = ir.load(normalized_files("minilm"))
    PassManager(parse_pipeline("rotate"), calibration=calibration, verify=False, progress=False).run(model)
    return model


def test_balancing_a_rotated_minilm_keeps_its_outputs(normalized_files, minilm_calibration):
    model = rotated_minilm(normalized_files, minilm_calibration)
    batches = minilm_calibration.batches[:2]
    before = run_batches(make_session(model), batches)
    hadamards = [n for n in model.graph if (n.domain, n.op_type) == (DOMAIN, OP)]
    sizes_before = {(n.inputs[1].shape[0], n.inputs[2].shape[0]) for n in hadamards}
    assert balance_rotations(model) == len(hadamards) > 0
    after = run_batches(make_session(model), batches)
    for expected, got in zip(before, after, strict=True):
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=2e-4)
    sizes = {(int(n.inputs[1].shape[0]), int(n.inputs[2].shape[0])) for n in hadamards}
    assert sizes_before == {(128, 12), (32, 12)} and sizes == {(32, 48), (16, 24)}  # MLP 1536 and heads 384
    assert len({id(n.inputs[1]) for n in hadamards}) == 2  # one shared pair of initializers per size
    assert {"hadamard_1536_a", "hadamard_384_a"}.isdisjoint(model.graph.initializers)  # old factors dropped
    assert balance_rotations(model) == 0  # idempotent
