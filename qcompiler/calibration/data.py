"""Calibration inputs: loading, batching, validation against the model, hold-out split.

Three sources: an ``.npz`` of named arrays (samples along axis 0), a text file (one
sample per line, tokenized with the model's tokenizer), or any iterable of feed dicts.
Everything is checked against the model's inputs (names, rank, dtype, fixed dims,
finiteness) before anything runs, so a mismatch is one sentence, not an onnxruntime
traceback.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler.errors import CalibrationError

Feeds = dict[str, np.ndarray]


@dataclass
class CalibrationData:
    """Batches of named input arrays, with a description of where they came from."""

    batches: list[Feeds]
    source: str

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def num_samples(self) -> int:
        return sum(_batch_size(b) for b in self.batches)

    def fingerprint(self) -> str:
        """A digest of every array, so cached statistics know which data made them."""
        digest = hashlib.blake2b(digest_size=16)
        for batch in self.batches:
            for name in sorted(batch):
                array = np.ascontiguousarray(batch[name])
                digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
                digest.update(array.tobytes())
        return digest.hexdigest()

    def split(self, holdout_fraction: float = 0.25) -> tuple["CalibrationData", "CalibrationData"]:
        """(calibration, held-out) with no sample in both.

        The last ``holdout_fraction`` of the batches is held out (at least one); a single
        batch is cut in two along the sample axis first.
        """
        batches = self.batches
        if len(batches) == 1:
            batches = _halve(batches[0])
        if len(batches) < 2:
            raise CalibrationError("Calibration data needs at least two samples so one can be held out for verification.")
        count = min(len(batches) - 1, max(1, round(len(batches) * holdout_fraction)))
        return (CalibrationData(batches[:-count], f"{self.source} (calibration part)"),
                CalibrationData(batches[-count:], f"{self.source} (held-out part)"))


def token_mask(batch: Feeds) -> np.ndarray | None:
    """The batch's padding mask ``[batch, tokens]`` (a 0/1 input named like ``attention_mask``), if any."""
    for name, array in batch.items():
        if "mask" in name.lower() and array.ndim == 2 and (array.dtype.kind in "iub"):
            if np.all((array == 0) | (array == 1)):
                return array.astype(bool)
    return None


def real_tokens(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Rows of a ``[batch, tokens, C]`` activation at unpadded positions (``[n, C]``); other shapes as given.

    Padding positions compute activations no real input produces; keeping them would
    skew ranges, Hessians and searches toward tokens the deployed model never sees.
    """
    if mask is None or array.ndim != 3 or array.shape[:2] != mask.shape:
        return array
    return array[mask]


def real_token_runs(runs: Sequence[Mapping[str, np.ndarray]], batches: Sequence[Feeds]) -> list[dict[str, np.ndarray]]:
    """Each run's outputs (one dict per batch) at the unpadded positions of its batch (`real_tokens`)."""
    masks = [token_mask(batch) for batch in batches]
    return [{name: real_tokens(array, mask) for name, array in run.items()} for run, mask in zip(runs, masks)]


def _batch_size(batch: Feeds) -> int:
    first = next(iter(batch.values()))
    return int(first.shape[0]) if first.ndim else 1


def _halve(batch: Feeds) -> list[Feeds]:
    size = _batch_size(batch)
    if size < 2:
        return [batch]
    cut = size // 2
    return [{k: v[:cut] for k, v in batch.items()}, {k: v[cut:] for k, v in batch.items()}]


# --------------------------------------------------------------------------- sources


def from_npz(path: str | os.PathLike, batch_size: int = 8) -> CalibrationData:
    """Named arrays with samples along axis 0, cut into batches of ``batch_size``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as exc:
        raise CalibrationError(f"'{path}' is not a readable .npz archive of arrays ({exc}).") from exc
    if not arrays:
        raise CalibrationError(f"'{path}' holds no arrays.")
    counts = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise CalibrationError(f"Arrays in '{path}' must share a non-empty sample axis 0; they have {counts}.")
    total = next(iter(counts.values()))
    batches = [{name: a[start:start + batch_size] for name, a in arrays.items()} for start in range(0, total, batch_size)]
    return CalibrationData(batches, f"{path.name} ({total} samples)")


def from_text(path: str | os.PathLike, tokenizer: Any, input_names: Sequence[str], batch_size: int = 8,
              max_length: int = 128) -> CalibrationData:
    """One sample per non-empty line, tokenized and padded per batch."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"'{path}' is not a readable UTF-8 text file ({exc}).") from exc
    return from_sentences([line for line in lines if line], tokenizer, input_names, batch_size, max_length,
                          source=path.name)


def from_sentences(sentences: Sequence[str], tokenizer: Any, input_names: Sequence[str], batch_size: int = 8,
                   max_length: int = 128, *, source: str = "sentences") -> CalibrationData:
    if not sentences:
        raise CalibrationError(f"{source} holds no text to calibrate with.")
    batches = []
    for start in range(0, len(sentences), batch_size):
        encoded = tokenizer(list(sentences[start:start + batch_size]), padding=True, truncation=True,
                            max_length=max_length, return_tensors="np")
        missing = [name for name in input_names if name not in encoded]
        if missing:
            raise CalibrationError(
                f"The tokenizer does not produce model input '{missing[0]}' (it produces {', '.join(encoded)})."
            )
        batches.append({name: np.asarray(encoded[name]).astype(np.int64) for name in input_names})
    return CalibrationData(batches, f"{source} ({len(sentences)} samples)")


def from_iterable(feeds: Iterable[Mapping[str, Any]], source: str = "python iterable") -> CalibrationData:
    batches = []
    for index, feed in enumerate(feeds):
        if not isinstance(feed, Mapping):
            raise CalibrationError(f"Calibration item {index} is a {type(feed).__name__}, not a dict of named arrays.")
        batches.append({str(k): np.asarray(v) for k, v in feed.items()})
    if not batches:
        raise CalibrationError(f"The calibration {source} yielded no batches.")
    return CalibrationData(batches, f"{source} ({len(batches)} batches)")


# --------------------------------------------------------------------------- validation


def validate(data: CalibrationData, model: ir.Model, what: str = "calibration batch") -> None:
    """Check every batch against the model's inputs; raise one sentence on the first mismatch.

    ``what`` names a batch in that sentence as the command at hand knows it ("calibration
    batch", "evaluation batch", "the inputs of qcompile run").
    """
    inputs = {v.name: v for v in model.graph.inputs if v.name not in model.graph.initializers}
    for index, batch in enumerate(data.batches):
        where = f"{what} {index}" if len(data.batches) > 1 or what.endswith("batch") else what
        extra = sorted(set(batch) - set(inputs))
        if extra:
            raise CalibrationError(
                f"In {where}, '{extra[0]}' is not a model input (the model's inputs are: {', '.join(inputs)})."
            )
        for name, value in inputs.items():
            if name not in batch:
                raise CalibrationError(f"In {where}, model input '{name}' is missing.")
            _check_array(batch[name], value, where)


def _check_array(array: np.ndarray, value: ir.Value, where: str) -> None:
    name = value.name
    expected = value.dtype.numpy() if value.dtype is not None else None
    if expected is not None and array.dtype != expected:
        raise CalibrationError(f"In {where}, input '{name}' has dtype {array.dtype} but the model expects {expected}.")
    shape = value.shape
    if shape is not None:
        if array.ndim != len(shape):
            raise CalibrationError(
                f"In {where}, input '{name}' has rank {array.ndim} (shape {list(array.shape)}) "
                f"but the model expects rank {len(shape)} ({_shape_text(shape)})."
            )
        for axis, dim in enumerate(shape):
            if isinstance(dim, int) and array.shape[axis] != dim:
                raise CalibrationError(
                    f"In {where}, input '{name}' has size {array.shape[axis]} on axis {axis} "
                    f"but the model expects {dim} ({_shape_text(shape)})."
                )
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise CalibrationError(f"In {where}, input '{name}' contains NaN or Inf values.")


def _shape_text(shape: ir.Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
