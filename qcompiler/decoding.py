"""Causal language models with a KV cache: what the graph expects, and generation on any backend's session.

A decoder graph in the layout optimum and onnxruntime-genai use has inputs ``input_ids``,
``attention_mask`` (over past and new tokens), ``position_ids`` where the family uses
them, and ``past_key_values.{i}.key`` / ``.value`` of shape ``[batch, kv_heads, past,
head_dim]``; its outputs are ``logits`` and ``present.{i}.key`` / ``.value`` (past and new
tokens). One graph serves the prompt (an empty past) and every decode step (one new token,
the previous step's presents as the past).

Users give token ids (and a padding mask); the cache and the positions are the graph's
plumbing, filled here: an empty past, and ``position_ids = cumsum(mask) - 1`` so that
left-padded rows start at position 0 as transformers computes them. A prompt run with an
empty past computes exactly what the model without a cache computes, so calibration
statistics are the same tensors.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler.capture import GENERATION_KEY
from qcompiler.errors import QCompilerError

PAST_PATTERN = re.compile(r"^past_key_values\.(\d+)\.(key|value)(_scale|_zero)?$")
PRESENT_PATTERN = re.compile(r"^present\.(\d+)\.(key|value)(_scale|_zero)?$")
TOKENS, MASK, POSITIONS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
KINDS = ("key", "value")


@dataclass(frozen=True)
class CacheLayout:
    """Names and sizes of a decoder graph's cache plumbing.

    ``storage`` maps each tensor's suffix (``""`` for the keys or values themselves;
    ``_scale`` and ``_zero`` for a quantized cache, `qcompiler.quant.kv_cache`) to its
    dtype and last dim, the same for every layer, keys and values; ``head_dim`` is the
    stored last dim of the float cache (the head size), or of the codes when quantized.
    """

    layers: int
    kv_heads: int
    head_dim: int
    dtype: np.dtype
    has_mask: bool
    has_positions: bool
    storage: tuple[tuple[str, np.dtype, int], ...] = ()

    def past(self, layer: int, kind: str, suffix: str = "") -> str:
        return f"past_key_values.{layer}.{kind}{suffix}"

    def present(self, layer: int, kind: str, suffix: str = "") -> str:
        return f"present.{layer}.{kind}{suffix}"

    @property
    def quantized(self) -> bool:
        return len(self.storage) > 1

    def _pairs(self) -> list[tuple[str, str]]:
        suffixes = [suffix for suffix, _, _ in self.storage] or [""]
        return [(self.past(i, kind, suffix), self.present(i, kind, suffix))
                for i in range(self.layers) for kind in KINDS for suffix in suffixes]

    @property
    def past_names(self) -> list[str]:
        return [past for past, _ in self._pairs()]

    @property
    def present_names(self) -> list[str]:
        """Each past input's present output, in the same order."""
        return [present for _, present in self._pairs()]

    @property
    def filled_inputs(self) -> set[str]:
        """Inputs the user never gives: the cache and the positions are derived from the tokens and the mask."""
        return set(self.past_names) | ({POSITIONS} if self.has_positions else set())

    def bytes_per_token(self) -> int:
        """Cache bytes one token adds per sequence, over every layer's keys and values (codes, scales, zeros)."""
        per_head = sum(dtype.itemsize * last for _, dtype, last in self.storage)
        return 2 * self.layers * self.kv_heads * per_head


def cache_layout(model: ir.Model) -> CacheLayout | None:
    """The layout of ``model``'s KV cache, or None when it is not a decoder with one.

    A graph with some but not all of the names (a past without its present, a gap in the
    layer numbers, heads or head size not fixed) is refused: generation would feed it wrong.
    """
    inputs = {v.name: v for v in model.graph.inputs}
    outputs = {v.name for v in model.graph.outputs}
    past = {(int(m[1]), m[2], m[3] or ""): name for name in inputs if (m := PAST_PATTERN.match(name))}
    if not past:
        return None
    present = {(int(m[1]), m[2], m[3] or "") for name in outputs if (m := PRESENT_PATTERN.match(name))}
    layers = 1 + max(layer for layer, _, _ in past)
    suffixes = sorted({suffix for _, _, suffix in past})
    expected = {(i, kind, suffix) for i in range(layers) for kind in KINDS for suffix in suffixes}
    if set(past) != expected or present != expected or TOKENS not in inputs or LOGITS not in outputs:
        raise QCompilerError(
            "The model has past_key_values inputs but not the whole decoder layout (input_ids, "
            f"past_key_values.0..{layers - 1}.key/value in; logits, present.0..{layers - 1}.key/value out)."
        )
    storage = []
    for suffix in suffixes:
        value = inputs[past[(0, "key", suffix)]]
        shape = value.shape
        if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise QCompilerError(f"Cache input '{value.name}' must have shape [batch, heads, past, head_dim] with "
                                 f"heads and head_dim fixed; it has {shape}.")
        storage.append((suffix, np.dtype(value.dtype.numpy() if value.dtype is not None else np.float32), shape[3]))
    first = inputs[past[(0, "key", "")]]
    return CacheLayout(layers=layers, kv_heads=first.shape[1], head_dim=first.shape[3], dtype=storage[0][1],
                       has_mask=MASK in inputs, has_positions=POSITIONS in inputs, storage=tuple(storage))


def is_cache_input(value: ir.Value | None) -> bool:
    """A graph input holding a layer's past keys or values (``past_key_values.{i}.*``)."""
    return value is not None and value.producer() is None and bool(PAST_PATTERN.match(value.name or ""))


def require_layout(model: ir.Model, what: str) -> CacheLayout:
    """The cache layout of a model ``what`` needs to be a causal LM with a KV cache; one sentence otherwise."""
    layout = cache_layout(model)
    if layout is None:
        raise QCompilerError(f"{what} needs a causal language model with a KV cache (inputs input_ids and "
                             "past_key_values.*, outputs logits and present.*); this model has none.")
    return layout


def generation_settings(model: ir.Model) -> dict:
    """The source's generation settings recorded at capture (end-of-sequence ids, positions), or {}."""
    text = model.metadata_props.get(GENERATION_KEY)
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}


def check_prompt_length(model: ir.Model, tokens: int, new_tokens: int = 0) -> None:
    """Refuse a prompt (plus the tokens to generate) beyond the model's positions, in one sentence."""
    settings = generation_settings(model)
    limit = settings.get("max_position_embeddings")
    if isinstance(limit, int) and tokens + new_tokens > limit:
        raise QCompilerError(f"The prompt has {tokens} tokens and {new_tokens} more are asked for, beyond the "
                             f"model's {limit} positions.")
    window = settings.get("sliding_window")
    if isinstance(window, int) and tokens + new_tokens > window:
        raise QCompilerError(f"The prompt has {tokens} tokens and {new_tokens} more are asked for, beyond the "
                             f"model's sliding window of {window}, which its exported cache does not slide.")


def positions_from_mask(mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Positions of the last ``new_tokens`` columns of ``mask``: ``cumsum(mask) - 1``, padding at 1 as transformers."""
    positions = np.cumsum(mask, axis=-1) - 1
    positions = np.where(mask == 0, 1, positions)
    return positions[:, -new_tokens:].astype(np.int64)


def empty_cache(layout: CacheLayout, batch: int) -> dict[str, np.ndarray]:
    shapes = {suffix: (dtype, last) for suffix, dtype, last in layout.storage}
    cache = {}
    for name in layout.past_names:
        dtype, last = shapes[PAST_PATTERN.match(name)[3] or ""]
        cache[name] = np.zeros((batch, layout.kv_heads, 0, last), dtype=dtype)
    return cache


def complete_feeds(layout: CacheLayout, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` (token ids, optionally a mask) with an empty cache and the positions filled in.

    A batch that already carries a cache or positions keeps them: the user knows better.
    """
    completed = dict(feeds)
    if TOKENS not in completed:
        return completed
    ids = np.asarray(completed[TOKENS])
    batch, tokens = ids.shape
    if layout.has_mask and MASK not in completed:
        completed[MASK] = np.ones((batch, tokens), dtype=np.int64)
    for name, array in empty_cache(layout, batch).items():
        completed.setdefault(name, array)
    if layout.has_positions and POSITIONS not in completed:
        mask = completed.get(MASK, np.ones((batch, tokens), dtype=np.int64))
        completed[POSITIONS] = positions_from_mask(np.asarray(mask), tokens)
    return completed


def prompt_and_step(session, layout: CacheLayout, batches: Sequence[Mapping[str, np.ndarray]]) -> list[dict]:
    """Per batch: the prompt's outputs without the cache, and the logits of one decode step on the model's own cache.

    What a function-preserving pass must keep is what the user sees, the logits, over any
    number of steps; the cache is state, which a pass may store in another basis (a
    rotation or smoothing of v_proj transforms the cached values, and o_proj undoes it).
    So the presents are not compared; instead each model decodes one more token (the
    prompt's first, at the next position) from the cache it wrote itself, under
    ``logits@decode``, which exercises past inputs and the Concat of past and new.
    """
    outputs = [o.name for o in session.get_outputs()]
    results = []
    for feeds in batches:
        feeds = refill(layout, feeds)
        values = dict(zip(outputs, session.run(outputs, feeds)))
        result = {name: value for name, value in values.items() if not PRESENT_PATTERN.match(name)}
        ids = np.asarray(feeds[TOKENS])
        mask = np.asarray(feeds.get(MASK, np.ones(ids.shape, dtype=np.int64)))
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), dtype=mask.dtype)], axis=1)
        step = {TOKENS: ids[:, :1], **{past: values[present]
                                       for past, present in zip(layout.past_names, layout.present_names)}}
        if layout.has_mask:
            step[MASK] = mask
        if layout.has_positions:
            step[POSITIONS] = positions_from_mask(mask, 1)
        result[f"{LOGITS}@decode"] = session.run([LOGITS], step)[0]
        results.append(result)
    return results


def refill(layout: CacheLayout, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` with the empty cache this layout stores (a quantized cache has other tensors than a float one).

    Batches are completed once, for the model as given; after ``kv=`` quantized its cache,
    the same tokens need the codes, scales and zero points instead.
    """
    tokens_only = {name: value for name, value in feeds.items() if not PAST_PATTERN.match(name)}
    return complete_feeds(layout, tokens_only)


# --------------------------------------------------------------------------- generation


@dataclass
class Generation:
    """Generated ids per row (prompt excluded), with the time spent on the prompt and on decode steps."""

    tokens: np.ndarray
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    logits: list[np.ndarray] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        rows = self.tokens.shape[0]
        return rows * self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def generate(
    session,
    layout: CacheLayout,
    prompt: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    on_step: Callable[[np.ndarray], None] | None = None,
    keep_logits: bool = False,
) -> Generation:
    """Generate up to ``max_new_tokens`` after ``prompt`` ``[batch, tokens]`` (left-padded where ``mask`` says so).

    Greedy with ``temperature=0``; otherwise sampling from ``softmax(logits / temperature)``
    restricted to the smallest set of tokens whose probability reaches ``top_p``. Rows that
    produce ``eos_token_id`` stop (they are padded with it) and generation ends when all have.
    ``on_step`` sees each step's new ids ``[batch]``, for streaming.
    """
    prompt = np.asarray(prompt, dtype=np.int64)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise QCompilerError(f"A prompt must be [batch, tokens] with at least one token, not shape {list(prompt.shape)}.")
    batch = prompt.shape[0]
    mask = np.ones_like(prompt) if mask is None else np.asarray(mask, dtype=np.int64)
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    rng = np.random.default_rng(seed)
    output_names = [LOGITS, *layout.present_names]
    feeds = complete_feeds(layout, {TOKENS: prompt, MASK: mask})
    if not layout.has_mask:
        feeds.pop(MASK, None)
    produced, kept = [], []
    finished = np.zeros(batch, dtype=bool)
    prefill = decode = 0.0
    for step in range(max_new_tokens):
        start = time.perf_counter()
        logits, *presents = session.run(output_names, feeds)
        elapsed = time.perf_counter() - start
        if step == 0:
            prefill = elapsed
        else:
            decode += elapsed
        last = logits[:, -1, :]
        if keep_logits:
            kept.append(last.copy())
        chosen = _choose(last, temperature, top_p, rng)
        if eos:
            fill = next(iter(eos))
            chosen = np.where(finished, fill, chosen)
            finished |= np.isin(chosen, list(eos))
        produced.append(chosen)
        if on_step is not None:
            on_step(chosen)
        if finished.all() or step == max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        feeds = {TOKENS: chosen[:, None].astype(np.int64), **dict(zip(layout.past_names, presents))}
        if layout.has_mask:
            feeds[MASK] = mask
        if layout.has_positions:
            feeds[POSITIONS] = positions_from_mask(mask, 1)
    tokens = np.stack(produced, axis=1) if produced else np.zeros((batch, 0), dtype=np.int64)
    return Generation(tokens=tokens, prefill_seconds=prefill, decode_seconds=decode,
                      decode_steps=max(0, len(produced) - 1), logits=kept)


def _choose(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    if temperature <= 0:
        return logits.argmax(axis=-1).astype(np.int64)
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    chosen = np.empty(len(probs), dtype=np.int64)
    for row, p in enumerate(probs):
        order = np.argsort(-p)
        cumulative = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]
        chosen[row] = rng.choice(keep, p=p[keep] / p[keep].sum())
    return chosen
