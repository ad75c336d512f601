"""Hadamard and orthogonal rotations for any width, including real LLM hidden sizes."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from qcompiler.hadamard import (
    Factor,
    RotationPlan,
    hadamard_matrix,
    orthogonal_matrix,
    paley_matrix,
    rotation_plan,
)
from qcompiler.online_rotation import factor_pair, rotate_last_axis

# Width -> plan. Real model widths: 384 MiniLM, 768 BERT-base, 1536/8960 Qwen2-1.5B,
# 3584/18944 Qwen2-7B, 4864 Qwen2-0.5B MLP, 11008 Llama-2-7B MLP, 14336 Llama-3-8B MLP,
# 29568 Qwen2-72B MLP. 384 is also Paley I (q=383) on its own, but the plan prefers the
# smallest non-Sylvester factor because the Sylvester part has a fast transform.
PLANS = {
    1: "R_1 (random orthogonal)",
    2: "H_2 (Sylvester)",
    12: "H_12 (Paley I, q=11)",
    20: "H_20 (Paley I, q=19)",
    28: "H_28 (Paley I, q=27)",
    36: "H_36 (Paley II, q=17)",
    40: "H_2 (Sylvester) x H_20 (Paley I, q=19)",
    52: "H_52 (Paley II, q=25)",
    60: "H_60 (Paley I, q=59)",
    64: "H_64 (Sylvester)",
    384: "H_32 (Sylvester) x H_12 (Paley I, q=11)",
    768: "H_64 (Sylvester) x H_12 (Paley I, q=11)",
    1536: "H_128 (Sylvester) x H_12 (Paley I, q=11)",
    3584: "H_128 (Sylvester) x H_28 (Paley I, q=27)",
    4864: "H_64 (Sylvester) x H_76 (Paley II, q=37)",
    11008: "H_32 (Sylvester) x H_344 (Paley I, q=343)",
    13696: "H_128 (Sylvester) x R_107 (random orthogonal)",
    14336: "H_512 (Sylvester) x H_28 (Paley I, q=27)",
    18944: "H_128 (Sylvester) x H_148 (Paley II, q=73)",
    29568: "H_32 (Sylvester) x H_924 (Paley II, q=461)",
}
SIZES = list(PLANS)
DENSE_LIMIT = 2048  # above this, forming Q Q^T costs seconds; check sampled rows instead
# Orders n = 0 mod 4 up to 300 that Sylvester, Paley I/II and Kronecker products cannot
# reach (the classical list; 92 needs Williamson's construction).
UNCOVERED = {92, 116, 156, 172, 184, 188, 232, 236, 260, 268, 292}


def assert_hadamard(h: np.ndarray) -> None:
    n = h.shape[0]
    assert h.shape == (n, n) and set(np.unique(h)) <= {-1, 1}
    hf = h.astype(np.float64)  # int8 products would overflow; float64 is exact here
    np.testing.assert_array_equal(hf @ hf.T, n * np.eye(n))


@pytest.mark.parametrize("n", SIZES)
def test_rotation_plan(n: int) -> None:
    plan = rotation_plan(n)
    assert plan.describe() == PLANS[n]
    assert math.prod(f.size for f in plan.factors) == n
    assert plan.exact_hadamard == ("R_" not in PLANS[n])
    for f in plan.factors:
        if f.kind != "random":
            assert_hadamard(hadamard_matrix(f.size))


@pytest.mark.parametrize("n", [n for n in SIZES if n <= DENSE_LIMIT])
def test_orthogonal_matrix_dense(n: int) -> None:
    q = orthogonal_matrix(n)
    assert q.shape == (n, n) and q.dtype == np.float64
    assert np.abs(q @ q.T - np.eye(n)).max() < 1e-10
    if rotation_plan(n).exact_hadamard:
        np.testing.assert_allclose(np.abs(q) * math.sqrt(n), 1.0, atol=1e-12)  # incoherence 1


@pytest.mark.parametrize("n", [n for n in SIZES if n > DENSE_LIMIT])
def test_large_rotation_sampled_rows(n: int) -> None:
    plan, rng = rotation_plan(n), np.random.default_rng(n)
    picked = rng.choice(n, size=16, replace=False)
    basis = np.zeros((16, n))
    basis[np.arange(16), picked] = 1.0
    factors = factor_pair(n)  # the online rotation's two factors: never the dense n x n Q
    rows = rotate_last_axis(basis, *factors)  # rows `picked` of Q
    assert np.abs(rows @ rows.T - np.eye(16)).max() < 1e-10
    x = rng.standard_normal((4, n))
    y = rotate_last_axis(x, *factors)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(y @ rows.T, x[:, picked], atol=1e-10)  # x Q Q^T = x on the sample
    if plan.exact_hadamard:
        np.testing.assert_allclose(np.abs(rows) * math.sqrt(n), 1.0, atol=1e-12)
    else:
        assert np.abs(rows).max() * math.sqrt(n) > 1.0


@pytest.mark.parametrize("n", [1, 2, 7, 12, 28, 40, 52, 60, 64, 214, 384, 768, 1536])
@pytest.mark.parametrize("seed", [0, 3])
def test_factored_rotation_matches_dense(n: int, seed: int) -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, n))
    expected = x @ orthogonal_matrix(n, seed=seed)
    np.testing.assert_allclose(rotate_last_axis(x, *factor_pair(n, seed)), expected, rtol=0, atol=1e-10)


def test_seed_only_moves_random_factors() -> None:
    assert rotation_plan(214).describe() == "H_2 (Sylvester) x R_107 (random orthogonal)"
    assert not np.allclose(orthogonal_matrix(214, seed=0), orthogonal_matrix(214, seed=1))
    np.testing.assert_array_equal(orthogonal_matrix(384, seed=0), orthogonal_matrix(384, seed=1))


def test_hadamard_matrix_every_claimed_order() -> None:
    uncovered = set()
    for n in range(1, 301):
        if n > 2 and n % 4:
            with pytest.raises(ValueError, match="exist only for orders 1, 2 and multiples of 4"):
                hadamard_matrix(n)
            continue
        try:
            h = hadamard_matrix(n)
        except ValueError as err:
            assert "No Hadamard construction" in str(err)
            uncovered.add(n)
            continue
        assert_hadamard(h)
    assert uncovered == UNCOVERED


@pytest.mark.parametrize("n", [-4, 0, 3, 6, 7, 10, 30])
def test_hadamard_matrix_impossible_orders(n: int) -> None:
    with pytest.raises(ValueError, match="exist only"):
        hadamard_matrix(n)


@pytest.mark.parametrize("n", [428, 13696])
def test_hadamard_matrix_unimplemented_orders(n: int) -> None:
    with pytest.raises(ValueError, match=f"No Hadamard construction is implemented for order {n}"):
        hadamard_matrix(n)


@pytest.mark.parametrize(
    "q, order",
    [(3, 4), (5, 12), (9, 20), (25, 52), (27, 28), (49, 100), (81, 164), (121, 244), (125, 252), (343, 344)],
)
def test_paley_over_prime_powers(q: int, order: int) -> None:
    h = paley_matrix(q)
    assert h.shape == (order, order)
    assert_hadamard(h)


@pytest.mark.parametrize("q", [1, 8, 15, 21])
def test_paley_rejects_non_prime_powers(q: int) -> None:
    with pytest.raises(ValueError, match="odd prime power"):
        paley_matrix(q)


def test_hadamard_matrix_cached_and_read_only() -> None:
    h = hadamard_matrix(28)
    assert h is hadamard_matrix(28)
    with pytest.raises(ValueError):
        h[0, 0] = 0
    q = orthogonal_matrix(13, kind="random")  # a private copy: callers may scale it in place
    q *= 2.0
    assert np.abs(orthogonal_matrix(13, kind="random")).max() <= 1.0


def test_random_orthogonal_matrix() -> None:
    q = orthogonal_matrix(50, kind="random", seed=7)
    assert np.abs(q @ q.T - np.eye(50)).max() < 1e-12
    np.testing.assert_array_equal(q, orthogonal_matrix(50, kind="random", seed=7))
    assert not np.allclose(q, orthogonal_matrix(50, kind="random", seed=8))


@pytest.mark.parametrize("n, kind", [(0, "hadamard"), (8, "dct")])
def test_orthogonal_matrix_rejects_bad_arguments(n: int, kind: str) -> None:
    with pytest.raises(ValueError):
        orthogonal_matrix(n, kind=kind)


def test_rotation_plan_is_a_frozen_value() -> None:
    plan = RotationPlan(12, (Factor("paley1", 12, "q=11"),))
    assert plan == rotation_plan(12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.n = 13  # type: ignore[misc]
