"""Latency side by side: several models on the same inputs, in one process, runs interleaved.

Machines are noisy; interleaving (A, B, A, B, ...) exposes every model to the same
noise, and the ratio of medians to the first model is the figure worth reporting.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir

from qcompiler.decoding import CacheLayout, cache_layout, complete_feeds, generate
from qcompiler.runtime import make_session


def synthetic_feeds(model: ir.Model, batch: int, sequence: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the right names, dtypes and shapes: token ids, all-ones masks, zero type ids, random floats."""
    rng = np.random.default_rng(seed)
    layout = cache_layout(model)
    filled = layout.filled_inputs if layout is not None else set()
    feeds = {}
    for value in model.graph.inputs:
        if value.name in model.graph.initializers or value.name in filled:
            continue
        dims = []
        for position, dim in enumerate(value.shape or []):
            dims.append(dim if isinstance(dim, int) else (batch if position == 0 else sequence))
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        name = value.name.lower()
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(dims).astype(dtype)
        elif "mask" in name:
            feeds[value.name] = np.ones(dims, dtype)
        elif "type" in name or "position" in name:
            feeds[value.name] = np.zeros(dims, dtype)
        else:
            vocabulary = embedding_rows(value)
            low, high = (1000, 5000) if vocabulary is None or vocabulary > 5000 else (0, vocabulary)
            feeds[value.name] = rng.integers(low, high, dims).astype(dtype)
    return complete_feeds(layout, feeds) if layout is not None else feeds


def embedding_rows(ids: ir.Value) -> int | None:
    """Rows of the embedding table that token ids ``ids`` index (a Gather of a constant table), if any."""
    for use in ids.uses():
        node = use.node
        if node.op_type == "Cast":
            rows = embedding_rows(node.outputs[0])
            if rows is not None:
                return rows
        elif node.op_type == "Gather" and use.idx == 1:
            table = node.inputs[0]
            if table is not None and table.const_value is not None and table.shape is not None:
                return int(table.shape[0])
    return None


def compare_latency(models: Mapping[str, ir.Model | Any], feeds: Mapping[str, np.ndarray], runs: int = 20,
                    threads: int = 0) -> dict[str, dict[str, float]]:
    """Median latency of each model (or ready session, such as a TVM one) and its ratio to the first one's.

    Runs are interleaved so every contender sees the same machine noise; onnxruntime's pools do
    not spin between runs (a spinning pool would hold the cores the next contender runs on).
    """
    sessions = {name: model if hasattr(model, "run") else make_session(model, threads=threads, spinning=False,
                                                                         fuse_qdq=True)
                for name, model in models.items()}
    for session in sessions.values():
        session.run(None, dict(feeds))  # warm-up: allocations, kernel selection
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            tick = time.perf_counter()
            session.run(None, dict(feeds))
            times[name].append(time.perf_counter() - tick)
    baseline = statistics.median(next(iter(times.values())))
    return {name: {"median_ms": statistics.median(t) * 1000, "ratio": statistics.median(t) / baseline}
            for name, t in times.items()}


def compare_decode(sessions: Mapping[str, tuple[Any, CacheLayout]], *, batch: int, prompt_length: int, new_tokens: int,
                   vocabulary: int, runs: int = 5, seed: int = 0) -> dict[str, dict[str, float]]:
    """Prefill milliseconds and decode tokens/s of each ``(session, cache layout)``, runs interleaved.

    Every contender generates ``new_tokens`` greedily (no end-of-sequence stop, so the work is
    the same whatever tokens come out) after the same random prompt; medians over ``runs``,
    and each one's decode speed as a ratio to the first contender's.
    """
    prompt = np.random.default_rng(seed).integers(0, vocabulary, (batch, prompt_length))
    for session, layout in sessions.values():  # warm-up
        generate(session, layout, prompt, max_new_tokens=2)
    prefill: dict[str, list[float]] = {name: [] for name in sessions}
    decode: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, (session, layout) in sessions.items():
            result = generate(session, layout, prompt, max_new_tokens=new_tokens)
            prefill[name].append(result.prefill_seconds)
            decode[name].append(result.decode_tokens_per_second)
    baseline = statistics.median(next(iter(decode.values())))
    return {name: {"prefill_ms": statistics.median(prefill[name]) * 1000,
                   "decode_tokens_per_s": statistics.median(decode[name]),
                   "decode_ratio": statistics.median(decode[name]) / baseline} for name in sessions}
