"""Orthogonal rotations for spreading activation outliers (QuaRot-style), for any width.

A few activation channels in LLMs carry values 100x larger than the rest, which ruins
per-tensor quantization. Multiplying activations by an orthogonal Q (and weights by
Q^T, so the function is unchanged) spreads every outlier over all channels. A
normalized Hadamard matrix is the best such Q: every entry is +-1/sqrt(n), so no
channel can keep more than its fair share (incoherence max|Q_ij| * sqrt(n) = 1), and
its Sylvester part has an O(n log n) transform.

Hidden sizes are rarely powers of two (3584, 4864, 11008, 18944, 29568 = 2^k * m with m
odd), so a width n = 2^k * m is rotated by H_{2^(k-j)} (Sylvester) x H_{2^j m}, taking
the smallest j for which H_{2^j m} can be built. Covered exactly:

* Sylvester: orders 2^k;
* Paley I: order q + 1 for a prime power q = 3 mod 4 (e.g. 12, 20, 28, 60, 344);
* Paley II: order 2(q + 1) for a prime power q = 1 mod 4 (e.g. 36, 52, 76, 148, 924);
* Kronecker products of the above.

Paley matrices over GF(p^k) use polynomial arithmetic modulo an irreducible polynomial.
Where no order 2^j m is covered (13696 = 2^7 * 107), the odd part m gets a seeded
random orthogonal matrix instead; so do odd widths. Such plans are orthogonal but not
exact Hadamard (`RotationPlan.exact_hadamard` is False).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

_NAMES = {"sylvester": "Sylvester", "paley1": "Paley I", "paley2": "Paley II"}
_H2 = np.array([[1, 1], [1, -1]], dtype=np.int8)


class Factor(NamedTuple):
    """One Kronecker factor: kind ("sylvester", "paley1", "paley2", "random"), size, detail."""

    kind: str
    size: int
    detail: str = ""


@dataclass(frozen=True)
class RotationPlan:
    """An n x n orthogonal matrix as the Kronecker product of small normalized factors."""

    n: int
    factors: tuple[Factor, ...]

    def describe(self) -> str:
        """Human-readable plan, e.g. ``H_32 (Sylvester) x H_12 (Paley I, q=11)``."""
        parts = []
        for f in self.factors:
            if f.kind == "random":
                parts.append(f"R_{f.size} (random orthogonal)")
            else:
                parts.append(f"H_{f.size} ({_NAMES[f.kind]}{', ' + f.detail if f.detail else ''})")
        return " x ".join(parts)

    @property
    def exact_hadamard(self) -> bool:
        """True when the plan is a scaled +-1 Hadamard matrix (incoherence exactly 1)."""
        return all(f.kind != "random" for f in self.factors)


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, or None: Paley needs a finite field of order q."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q, k = q // p, k + 1
    return (p, k) if q == 1 else None


def _polymod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of a modulo the monic f over GF(p); coefficients lowest degree first."""
    a, d = list(a) + [0] * len(f), len(f) - 1
    for top in range(len(a) - 1, d - 1, -1):
        c = a[top]
        for i in range(d + 1):
            a[top - d + i] = (a[top - d + i] - c * f[i]) % p
    return a[:d]


def _irreducible(p: int, k: int) -> list[int]:
    """A monic degree-k polynomial over GF(p) with no factor of degree <= k/2."""
    divisors = [[*g, 1] for d in range(1, k // 2 + 1) for g in itertools.product(range(p), repeat=d)]
    candidates = ([*tail, 1] for tail in itertools.product(range(p), repeat=k))
    return next(f for f in candidates if all(any(_polymod(f, g, p)) for g in divisors))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = chi(a - b) over GF(q), chi(x) = x^((q-1)/2) (+1 on nonzero squares)."""
    p, k = _prime_power(q)
    f, powers = _irreducible(p, k), p ** np.arange(k)
    chi = -np.ones(q, dtype=np.int8)
    chi[0] = 0
    for x in range(1, q):
        digits = [(x // p**i) % p for i in range(k)]
        chi[int(np.dot(_polymod(np.convolve(digits, digits).tolist(), f, p), powers))] = 1
    elems, diff = np.arange(q, dtype=np.int32), np.zeros((q, q), dtype=np.int32)
    for i in range(k):  # subtraction in GF(p^k) is digit-wise subtraction mod p
        d = (elems // p**i) % p
        diff += (d[:, None] - d[None, :]) % p * p**i
    return chi[diff]


def paley_matrix(q: int) -> np.ndarray:
    """Paley I (order q+1, q = 3 mod 4) or Paley II (order 2(q+1), q = 1 mod 4), int8."""
    if _prime_power(q) is None or q % 2 == 0:
        raise ValueError(f"Paley constructions need an odd prime power q, got {q}.")
    ones = np.ones((q, 1), dtype=np.int8)
    if q % 4 == 3:
        return np.block([[np.ones((1, 1), np.int8), ones.T], [-ones, _jacobsthal(q) + np.eye(q, dtype=np.int8)]])
    c = np.block([[np.zeros((1, 1), np.int8), ones.T], [ones, _jacobsthal(q)]])
    d2 = np.array([[1, -1], [-1, -1]], dtype=np.int8)  # replaces the zero diagonal of c
    return np.kron(c, _H2) + np.kron(np.eye(q + 1, dtype=np.int8), d2)


@functools.cache
def _recipe(n: int) -> tuple[Factor, ...] | None:
    """Leaves of a Hadamard construction of order n (Kronecker in order), or None."""
    if n & (n - 1) == 0:
        return (Factor("sylvester", n),)
    if n % 4:
        return None
    for kind, q, residue in (("paley1", n - 1, 3), ("paley2", n // 2 - 1, 1)):
        if q % 4 == residue and _prime_power(q):
            return (Factor(kind, n, f"q={q}"),)
    splits = [(1 << i, n >> i) for i in range((n & -n).bit_length() - 1, 0, -1)]
    splits += [(a, n // a) for a in range(12, math.isqrt(n) + 1, 4) if n % (4 * a) == 0]
    for a, b in splits:  # Sylvester factors first (largest first), then Paley x Paley
        if (ra := _recipe(a)) and (rb := _recipe(b)):
            return ra + rb
    return None


def is_sylvester(matrix: np.ndarray) -> bool:
    """Whether ``matrix`` is ``H_s / sqrt(s)`` for a power of two ``s``: then it splits as ``H_u kron H_(s/u)``."""
    s = matrix.shape[0]
    if matrix.shape != (s, s) or s & (s - 1):
        return False
    return bool(np.allclose(matrix * math.sqrt(s), hadamard_matrix(s), atol=1e-6))


@functools.lru_cache(maxsize=32)
def hadamard_matrix(n: int) -> np.ndarray:
    """A +-1 matrix H with H H^T = n I, as int8 to keep the cache small.

    The array is cached, hence read-only; cast it (e.g. to float64) before multiplying,
    since int8 products overflow.

    Tries Sylvester, Paley I, Paley II, then Kronecker products; raises ValueError
    when no construction for order n is implemented.
    """
    if n < 1 or (n > 2 and n % 4):
        raise ValueError(f"Hadamard matrices exist only for orders 1, 2 and multiples of 4, not {n}.")
    recipe = _recipe(n)
    if recipe is None:
        raise ValueError(f"No Hadamard construction is implemented for order {n}.")
    h = np.ones((1, 1), dtype=np.int8)
    for f in recipe:
        if f.kind == "sylvester":
            leaf = functools.reduce(np.kron, [_H2] * (f.size.bit_length() - 1), np.ones((1, 1), np.int8))
        else:
            leaf = paley_matrix(f.size - 1 if f.kind == "paley1" else f.size // 2 - 1)
        h = np.kron(h, leaf)
    h.flags.writeable = False
    return h


@functools.cache
def rotation_plan(n: int) -> RotationPlan:
    """Sylvester 2^(k-j) x H_{2^j m} for the smallest covered j, else H_{2^k} x R_m."""
    if n < 1:
        raise ValueError(f"A rotation needs at least one channel, got n={n}.")
    k = (n & -n).bit_length() - 1
    m = n >> k
    if m == 1:
        inner = () if n > 1 else (Factor("random", 1),)
    else:  # smallest j with a covered order 2^j m; else (always for odd n) a random odd part
        inner = next((r for j in range(k + 1) if (r := _recipe(m << j))), (Factor("random", m),))
    rest = tuple(f for f in inner if f.kind != "sylvester")
    sylvester = n // math.prod(f.size for f in rest)  # all powers of two, merged into one FWHT
    return RotationPlan(n, ((Factor("sylvester", sylvester),) if sylvester > 1 else ()) + rest)


@functools.lru_cache(maxsize=16)
def _random_orthogonal(n: int, seed: int) -> np.ndarray:
    """Haar-random orthogonal matrix: QR of a seeded Gaussian, signs fixed so R_ii > 0."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    q *= np.where(np.diag(r) < 0, -1.0, 1.0)
    q.flags.writeable = False
    return q


def factor_matrix(f: Factor, seed: int) -> np.ndarray:
    """A plan factor, normalized; hadamard_matrix(size) rebuilds exactly the planned leaf
    because plans take their leaves from the same deterministic `_recipe`."""
    if f.kind == "random":
        return _random_orthogonal(f.size, seed)
    return hadamard_matrix(f.size) / math.sqrt(f.size)


def orthogonal_matrix(n: int, kind: str = "hadamard", seed: int = 0) -> np.ndarray:
    """Dense float64 Q with Q Q^T = I: the rotation_plan(n) matrix, or Haar-random."""
    if n < 1:
        raise ValueError(f"An orthogonal matrix needs n >= 1, got {n}.")
    if kind == "random":
        return _random_orthogonal(n, seed).copy()
    if kind != "hadamard":
        raise ValueError(f"Unknown orthogonal matrix kind {kind!r}; use 'hadamard' or 'random'.")
    return functools.reduce(np.kron, (factor_matrix(f, seed) for f in rotation_plan(n).factors), np.ones((1, 1)))
