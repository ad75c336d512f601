"""What a recipe search must reach: ``cos>=0.998``, ``top1>=0.95``, ``kl<=0.05``, ``ppl<=1.05``.

A target names a held-out fidelity metric that the compile already records in its
manifest (sentence-embedding cosines for encoders, next-token agreement, KL divergence and
perplexity for causal LMs, the worst output cosine for any model) and the bound it must meet, in the direction that metric gets
better; a wrong direction or an unknown metric is one sentence.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from qcompiler.errors import QCompilerError


@dataclass(frozen=True)
class Metric:
    name: str
    meaning: str
    higher_is_better: bool
    causal: bool | None  # a next-token metric (causal LMs: True), a sentence-embedding one (False), or any model

    def read(self, fidelity: dict | None) -> float | None:
        """This metric of a compile's held-out fidelity record, if it has one."""
        if not fidelity:
            return None
        embedding, tokens = fidelity.get("embedding"), fidelity.get("next_token")
        if self.name == "out-cos":
            return min((o["cosine"] for o in fidelity["outputs"].values()), default=None)
        if self.name == "cos":
            return embedding["mean_cosine"] if embedding else None
        if self.name == "min-cos":
            return embedding["min_cosine"] if embedding else None
        if tokens is None:
            return None
        if self.name == "top1":
            return tokens["top1_agreement"]
        if self.name == "kl":
            return tokens["mean_kl"]
        return tokens["perplexity"] / tokens["reference_perplexity"]


METRICS = {m.name: m for m in (
    Metric("cos", "mean cosine of held-out sentence embeddings", True, False),
    Metric("min-cos", "worst cosine of a held-out sentence embedding", True, False),
    Metric("top1", "held-out top-1 next-token agreement", True, True),
    Metric("kl", "mean KL divergence of held-out next-token distributions (nats)", False, True),
    Metric("ppl", "held-out perplexity relative to the source's", False, True),
    Metric("out-cos", "worst held-out cosine of any model output (any model: CNNs, classifiers)", True, None),
)}


@dataclass(frozen=True)
class Target:
    metric: Metric
    bound: float

    def __str__(self) -> str:
        return f"{self.metric.name}{'>=' if self.metric.higher_is_better else '<='}{self.bound:g}"

    def met(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value >= self.bound if self.metric.higher_is_better else value <= self.bound

    def better(self, value: float | None) -> float:
        """A key that grows as ``value`` gets better (missing values last)."""
        if value is None or not math.isfinite(value):
            return -math.inf
        return value if self.metric.higher_is_better else -value


def parse_target(text: str) -> Target:
    """``cos>=0.998`` and the like; an unknown metric or a wrong direction is one sentence."""
    match = re.fullmatch(r"\s*([a-z0-9-]+)\s*(>=|<=)\s*([0-9.eE+-]+)\s*", text or "")
    known = ", ".join(f"{m.name}{'>=' if m.higher_is_better else '<='}X ({m.meaning})" for m in METRICS.values())
    if match is None:
        raise QCompilerError(f"The search target '{text}' is not METRIC>=VALUE or METRIC<=VALUE; targets are {known}.")
    name, direction, number = match.groups()
    metric = METRICS.get(name)
    if metric is None:
        raise QCompilerError(f"The search target names an unknown metric '{name}'; targets are {known}.")
    if (direction == ">=") != metric.higher_is_better:
        want = ">=" if metric.higher_is_better else "<="
        raise QCompilerError(f"{name} is {'higher' if metric.higher_is_better else 'lower'} when better, so its target "
                             f"is {name}{want}VALUE, not {name}{direction}{number}.")
    try:
        bound = float(number)
    except ValueError:
        raise QCompilerError(f"The search target's bound '{number}' is not a number.") from None
    if not math.isfinite(bound):
        raise QCompilerError(f"The search target's bound must be finite, not {number}.")
    return Target(metric, bound)


def parse_budget(text: str | float | None) -> float | None:
    """Seconds from ``90``, ``90s``, ``20m`` or ``1.5h`` (None: no limit)."""
    if text is None or isinstance(text, (int, float)):
        if text is not None and text <= 0:
            raise QCompilerError(f"The search budget must be positive, not {text}.")
        return None if text is None else float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise QCompilerError(f"The search budget '{text}' is not a positive duration such as 900, 90s, 20m or 1h.")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
