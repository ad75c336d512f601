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

from qcompiler.runtime import make_session


def synthetic_feeds(model: ir.Model, batch: int, sequence: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the right names, dtypes and shapes: token ids, all-ones masks, zero type ids, random floats."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
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
            feeds[value.name] = rng.integers(1000, 5000, dims).astype(dtype)
    return feeds


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
