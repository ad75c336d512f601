"""The calibration engine: run the model on calibration batches, reduce tensors to statistics.

Passes ask for statistics of named tensors; the engine runs onnxruntime on the model with
those tensors exposed as extra outputs and folds each batch into `TensorStats` before
the next batch runs, so memory holds one batch of activations plus O(C) state per
tensor (O(C^2) with ``X^T X``). When the exposed tensors of one batch would exceed
the memory budget, they are split into blocks that each take their own pass over the
data. Results are cached by the tensor's fingerprint (its computation cone) and the
data's fingerprint, so a pass that rewrites the cone above a tensor invalidates exactly
the statistics that came from it; ``X^T X`` (C^2 float64 per tensor, the bulk of the
state for GPTQ) stays cached only within the memory budget, oldest dropped first, so
the cache of a deep model's compile does not grow with depth. Channels are a tensor's
last axis, or axis 1 for the tensors asked for ``channels_first`` (what a convolution
reads). Token activations of padded text batches are reduced over real tokens only (the
batch's ``attention_mask``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.fingerprint import value_fingerprints
from qcompiler.calibration.data import CalibrationData, real_tokens, token_mask
from qcompiler.calibration.stats import TensorStats
from qcompiler.errors import CalibrationError, QCompilerError
from qcompiler.progress import progress
from qcompiler.runtime import make_session

DEFAULT_MEMORY_BUDGET = 2 * 1024**3
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(text: str | int) -> int:
    """Bytes from ``2147483648``, ``512M``, ``8G`` or ``8GiB`` (binary units)."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
        if match is None:
            raise QCompilerError(f"The memory budget '{text}' is not a size such as 512M, 8G or 2147483648.")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value < 2**20:
        raise QCompilerError(f"The memory budget {text} is below 1 MiB, too small to calibrate anything.")
    return value


@dataclass
class MemoryPlan:
    """How a collection will run: blocks of tensors and the projected peak memory."""

    blocks: list[list[str]]
    batch_bytes: dict[str, int]
    state_bytes: int
    unknown_dims: bool
    xtx_bytes: int = 0  # the part of state_bytes that is X^T X

    @property
    def peak_bytes(self) -> int:
        worst_block = max((sum(self.batch_bytes[n] for n in block) for block in self.blocks), default=0)
        return worst_block + self.state_bytes

    def describe(self) -> str:
        estimate = " (estimate; some dimensions unknown before running)" if self.unknown_dims else ""
        return (f"projected peak memory {self.peak_bytes / 2**20:.1f} MiB{estimate}: "
                f"{len(self.blocks)} block(s) of exposed activations, {self.state_bytes / 2**20:.1f} MiB of statistics")


@dataclass
class CollectionRecord:
    tensors: int
    cached: int
    batches: int
    blocks: int
    seconds: float
    peak_estimate_bytes: int


@dataclass
class CalibrationEngine:
    """Collects and caches statistics over one fixed set of calibration batches."""

    data: CalibrationData
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    progress: bool = True
    log: Callable[[str], None] | None = None
    records: list[CollectionRecord] = field(default_factory=list)
    _cache: dict[tuple[str, bool, int, str], TensorStats] = field(default_factory=dict)
    _data_print: str = ""

    def __post_init__(self) -> None:
        if not self.data.batches:
            raise CalibrationError("Calibration data has no batches.")
        self._data_print = self.data.fingerprint()

    def collect(self, model: ir.Model, tensors: Sequence[str], xtx: Iterable[str] = (),
                channels_first: Iterable[str] = ()) -> dict[str, TensorStats]:
        """Statistics for each tensor name (``X^T X`` too for names in ``xtx``; channels on axis 1 for ``channels_first``)."""
        want_xtx, axis_one = set(xtx), set(channels_first)
        prints = value_fingerprints(model.graph)
        unknown = [n for n in tensors if n not in prints]
        if unknown:
            raise CalibrationError(f"The model has no tensor named '{unknown[0]}' to calibrate.")
        keys = {n: (prints[n], n in want_xtx, 1 if n in axis_one else -1, self._data_print) for n in tensors}
        missing = list(dict.fromkeys(n for n in tensors if keys[n] not in self._cache))
        start = time.perf_counter()
        plan = self.plan(model, missing, want_xtx, axis_one) if missing else None
        if plan is not None:
            self._evict_xtx(keep={keys[n] for n in tensors}, incoming=plan.xtx_bytes)
            if self.log:
                self.log(f"calibrating {len(missing)} tensor(s) over {len(self.data)} batch(es); {plan.describe()}")
            for name, stats in self._run(model, plan, want_xtx, axis_one).items():
                self._cache[keys[name]] = stats
            self._evict_xtx(keep={keys[n] for n in tensors})
        self.records.append(CollectionRecord(
            tensors=len(set(tensors)), cached=len(set(tensors)) - len(missing), batches=len(self.data),
            blocks=len(plan.blocks) if plan else 0, seconds=time.perf_counter() - start,
            peak_estimate_bytes=plan.peak_bytes if plan else 0))
        return {n: self._cache[keys[n]] for n in tensors}

    def samples(self, model: ir.Model, tensors: Sequence[str], rows: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
        """Up to ``rows`` token rows ``[n, C]`` of each tensor, drawn evenly from every batch.

        Searches (smooth's alpha, shift's threshold) evaluate quantization error on these
        instead of full activations, so their memory stays ``O(rows * C)`` per tensor.
        """
        rng = np.random.default_rng(seed)
        per_batch = max(1, -(-rows // len(self.data)))
        picked: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
        session = make_session(model, list(tensors))
        for feeds in self.data.batches:
            mask = token_mask(feeds)
            for name, array in zip(tensors, session.run(list(tensors), feeds)):
                flat = real_tokens(array, mask).reshape(-1, array.shape[-1])
                take = rng.choice(flat.shape[0], size=min(per_batch, flat.shape[0]), replace=False)
                picked[name].append(flat[np.sort(take)].astype(np.float32))
        return {name: np.concatenate(parts)[:rows] for name, parts in picked.items()}

    def _evict_xtx(self, keep: set, incoming: int = 0) -> None:
        """Drop the oldest cached ``X^T X`` statistics until they and ``incoming`` bytes more fit the memory budget
        (never those just asked for)."""
        held = [(key, stats) for key, stats in self._cache.items() if stats.xtx is not None]
        total = sum(stats.xtx.nbytes for _, stats in held) + incoming
        for key, stats in held:
            if total <= self.memory_budget:
                break
            if key not in keep:
                del self._cache[key]
                total -= stats.xtx.nbytes

    def examples(self, model: ir.Model, tensors: Sequence[str], count: int) -> dict[str, np.ndarray]:
        """The whole tensors of the first ``count`` samples (axis 0) of the calibration batches."""
        session = make_session(model, list(tensors))
        picked: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
        taken = 0
        for feeds in self.data.batches:
            if taken >= count:
                break
            arrays = session.run(list(tensors), feeds)
            for name, array in zip(tensors, arrays):
                picked[name].append(array[:count - taken].astype(np.float32))
            taken += len(arrays[0][:count - taken]) if arrays else count
        return {name: np.concatenate(parts) for name, parts in picked.items()}

    # ------------------------------------------------------------------ planning
    def plan(self, model: ir.Model, tensors: Sequence[str], xtx: set[str], axis_one: set[str] = frozenset()) -> MemoryPlan:
        """Estimate per-batch bytes of each exposed tensor and pack tensors into blocks."""
        values = _values_by_name(model.graph)
        sizes = _symbol_sizes(model.graph, self.data.batches[0])
        fallback = max((d for a in self.data.batches[0].values() for d in a.shape), default=1)
        batch_bytes, state, xtx_bytes, unknown_dims = {}, 0, 0, False
        estimates = {}
        for name in tensors:
            value = values[name]
            if value.dtype is not None and not value.dtype.is_floating_point():
                raise CalibrationError(f"Tensor '{name}' is {value.dtype}, not floating point: it has no activation statistics.")
            estimates[name] = _elements(value.shape, sizes)
        probed = _probe_elements(model, [n for n, e in estimates.items() if e is None], self.data.batches[0])
        for name in tensors:
            value = values[name]
            shape = value.shape
            elements, known = estimates[name] or probed.get(name), True
            if elements is None:  # the probe could not run: every unknown dim as large as the largest input dim
                known, elements = False, int(np.prod([d if isinstance(d, int) else fallback
                                                      for d in (shape or [fallback] * 3)]))
            unknown_dims |= not known
            itemsize = value.dtype.itemsize if value.dtype is not None else 4
            batch_bytes[name] = elements * (itemsize + 4)  # onnxruntime's copy plus our float32 view
            axis = 1 if name in axis_one else -1
            known_channels = shape is not None and len(shape) > max(axis, 0) and isinstance(shape[axis], int)
            channels = shape[axis] if known_channels else fallback
            state += TensorStats.projected_state_bytes(channels, name in xtx)
            xtx_bytes += channels**2 * 8 if name in xtx else 0
        blocks: list[list[str]] = []
        current, current_bytes = [], 0
        for name in tensors:
            if current and current_bytes + batch_bytes[name] > self.memory_budget:
                blocks.append(current)
                current, current_bytes = [], 0
            current.append(name)
            current_bytes += batch_bytes[name]
        if current:
            blocks.append(current)
        return MemoryPlan(blocks, batch_bytes, state, unknown_dims, xtx_bytes)

    # ------------------------------------------------------------------ running
    def _run(self, model: ir.Model, plan: MemoryPlan, xtx: set[str], axis_one: set[str]) -> dict[str, TensorStats]:
        results: dict[str, TensorStats] = {}
        total = len(plan.blocks) * len(self.data)
        with progress("calibrating", total, self.progress) as advance:
            for block in plan.blocks:
                session = make_session(model, block)
                for feeds in self.data.batches:
                    arrays = session.run(block, feeds)
                    mask = token_mask(feeds)
                    for name, array in zip(block, arrays):
                        if not np.all(np.isfinite(array)):
                            raise CalibrationError(f"Tensor '{name}' has NaN or Inf values on the calibration data.")
                        if name not in results:
                            axis = 1 if name in axis_one and array.ndim > 1 else -1
                            channels = array.shape[axis] if array.ndim else 1
                            results[name] = TensorStats(channels, with_xtx=name in xtx, channel_axis=axis)
                        results[name].update(real_tokens(array, mask))
                    advance()
                del session
        return results


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    for node in graph:
        for output in node.outputs:
            if output.name:
                values[output.name] = output
    return values


def _elements(shape: ir.Shape | None, sizes: dict[str, int]) -> int | None:
    """Elements of a tensor per batch from its shape and the input symbols' sizes, None where a dim is unknown."""
    if shape is None:
        return None
    elements = 1
    for dim in shape:
        size = dim if isinstance(dim, int) else sizes.get(str(dim))
        if size is None:
            return None
        elements *= size
    return elements


def _probe_elements(model: ir.Model, names: Sequence[str], batch: dict[str, np.ndarray]) -> dict[str, int]:
    """Elements per batch of tensors whose shapes depend on values (a CNN's spatial dims), measured on one sample.

    Shape inference leaves dims computed at run time symbolic (Paddle's ``[-1, 64, ?, ?]``);
    guessing each as the largest input dim overestimated a text-recognition CNN's
    activations ~100x and split its calibration into 40 passes over the data. One run on
    the first sample of the first batch measures them; an empty result keeps the guess.
    """
    if not names:
        return {}
    samples = max((int(a.shape[0]) for a in batch.values() if a.ndim), default=1)
    try:
        arrays = make_session(model, list(names)).run(list(names), {k: v[:1] for k, v in batch.items()})
    except Exception:  # an input whose axis 0 is no batch axis, say: the estimate stays the guess
        return {}
    return {name: int(array.size) * samples for name, array in zip(names, arrays)}


def _symbol_sizes(graph: ir.Graph, batch: dict[str, np.ndarray]) -> dict[str, int]:
    """Map symbolic input dims (``batch``, ``sequence``) to their sizes in a real batch."""
    sizes: dict[str, int] = {}
    for value in graph.inputs:
        if value.name in batch and value.shape is not None:
            for dim, size in zip(value.shape, batch[value.name].shape):
                if not isinstance(dim, int) and dim.value is not None:
                    sizes[str(dim)] = int(size)
    return sizes
