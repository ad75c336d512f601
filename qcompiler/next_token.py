"""Next-token fidelity of a causal LM: what its users feel, rather than a cosine of logits.

Per real position ``t`` (the padding mask says which) the reference and the candidate each
give a distribution over the next token. Reported: top-1 agreement (the greedy choice is
the same), the mean KL divergence ``KL(P_ref || P_cand)`` in nats, and the perplexity of
each on the text itself, ``exp(mean -log P(x_{t+1}))`` over positions whose next token is
real. Perplexity of a long text uses transformers' strided recipe: windows of ``window``
tokens every ``stride`` tokens, each scoring only the tokens the previous window did not,
so every token is scored once with up to ``window - stride`` tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from qcompiler.decoding import LOGITS, MASK, TOKENS, CacheLayout, complete_feeds
from qcompiler.errors import QCompilerError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def next_token_metrics(reference: Sequence[Mapping[str, np.ndarray]], candidate: Sequence[Mapping[str, np.ndarray]],
                       batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Top-1 agreement, mean KL and both perplexities over the real positions of ``batches``."""
    agree = kl = positions = 0.0
    ref_nll = cand_nll = scored = 0.0
    for ref_run, cand_run, feeds in zip(reference, candidate, batches):
        ids = np.asarray(feeds[TOKENS])
        mask = np.asarray(feeds.get(MASK, np.ones(ids.shape)))[:, -ids.shape[1]:].astype(bool)
        ref, cand = log_softmax(ref_run[LOGITS]), log_softmax(cand_run[LOGITS])
        agree += float(np.sum((ref.argmax(-1) == cand.argmax(-1))[mask]))
        kl += float(np.sum((np.exp(ref) * (ref - cand)).sum(-1)[mask]))
        positions += float(mask.sum())
        targets = mask[:, :-1] & mask[:, 1:]
        following = ids[:, 1:, None]
        ref_nll -= float(np.take_along_axis(ref[:, :-1], following, -1)[..., 0][targets].sum())
        cand_nll -= float(np.take_along_axis(cand[:, :-1], following, -1)[..., 0][targets].sum())
        scored += float(targets.sum())
    if positions == 0:
        raise QCompilerError("The data holds no real token positions to compare next-token predictions on.")
    return {
        "top1_agreement": agree / positions,
        "mean_kl": kl / positions,
        "reference_perplexity": math.exp(ref_nll / scored) if scored else float("nan"),
        "perplexity": math.exp(cand_nll / scored) if scored else float("nan"),
        "positions": int(positions),
    }


def next_token_line(metrics: Mapping[str, float]) -> str:
    """One line for the console and report.md."""
    return (f"top-1 agreement {metrics['top1_agreement']:.4f}, mean KL {metrics['mean_kl']:.3g} nats, perplexity "
            f"{metrics['reference_perplexity']:.4g} (source) -> {metrics['perplexity']:.4g} over "
            f"{metrics['positions']} positions")


@dataclass
class Perplexity:
    """Negative log-likelihood summed over ``tokens`` scored tokens."""

    nll: float
    tokens: int

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.tokens)


def windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, scored)`` per window: tokens ``[begin, end)`` run, the last ``scored`` of them count."""
    if length < window:
        raise QCompilerError(f"The text has {length} tokens, fewer than one window of {window}; give a longer text "
                             "or a smaller --window.")
    if not 0 < stride <= window:
        raise QCompilerError(f"The stride must be between 1 and the window ({window}), not {stride}.")
    spans, previous_end = [], 0
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        spans.append((begin, end, end - previous_end))
        previous_end = end
        if end == length:
            break
    return spans


def perplexity(session, layout: CacheLayout, ids: np.ndarray, *, window: int, stride: int) -> Perplexity:
    """Strided perplexity of ``session`` on one token sequence ``ids`` (each window from an empty cache)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    nll, tokens = 0.0, 0
    for begin, end, scored in windows(len(ids), window, stride):
        chunk = ids[begin:end][None, :]
        logits = session.run([LOGITS], complete_feeds(layout, {TOKENS: chunk}))[0][0]
        log_probs = log_softmax(logits[:-1])
        picked = -np.take_along_axis(log_probs, chunk[0, 1:, None], -1)[:, 0]
        # The first token of the text has no prediction; within a window the last `scored` tokens count.
        count = min(scored, len(picked))
        nll += float(picked[len(picked) - count:].sum())
        tokens += count
    return Perplexity(nll, tokens)
