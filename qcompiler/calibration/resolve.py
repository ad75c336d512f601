"""What the user gave as calibration data, turned into validated batches for this model.

A path (``.npz`` of named arrays, or text with a tokenizer), a `CalibrationData`, an
iterable of feed dicts, or nothing: a model that carries a tokenizer is then calibrated
on the sentences shipped with qcompiler (``qcompiler/data``; ``heldout.txt`` is disjoint
from ``calibration.txt`` and is for evaluation only).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import onnx_ir as ir

from qcompiler.calibration import data as calib_data
from qcompiler.calibration.data import CalibrationData
from qcompiler.capture import TOKENIZER_KEY, load_tokenizer
from qcompiler.decoding import cache_layout, complete_feeds
from qcompiler.errors import CalibrationError


def builtin_sentences(name: str = "calibration") -> list[str]:
    """Sentences shipped with the package: ``calibration`` or ``heldout`` (disjoint sets)."""
    text = resources.files("qcompiler").joinpath("data", f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def model_inputs(model: ir.Model) -> list[str]:
    """The inputs calibration data gives: a decoder's cache and positions are filled in (`qcompiler.decoding`)."""
    layout = cache_layout(model)
    filled = layout.filled_inputs if layout is not None else set()
    return [v.name for v in model.graph.inputs if v.name not in model.graph.initializers and v.name not in filled]


def fixed_batch(model: ir.Model) -> int | None:
    """The batch size every input fixes on axis 0 (exporters often write ``[1, 3, 224, 224]``), else None.

    Samples are then cut into batches of that size: a model exported for batch 1 runs on
    nothing else, and the user's ``.npz`` of 500 images should not be refused for it.
    """
    sizes = {value.shape[0] for value in model.graph.inputs
             if value.name not in model.graph.initializers and value.shape is not None and len(value.shape) > 0}
    if len(sizes) == 1:
        size = next(iter(sizes))
        if isinstance(size, int) and size > 0:
            return size
    return None


def resolve_calibration(
    calib: str | os.PathLike | CalibrationData | Iterable[dict[str, Any]] | None,
    model: ir.Model,
    *,
    tokenizer: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_length: int = 128,
    what: str = "calibration batch",
) -> CalibrationData | None:
    """Turn whatever the user gave as calibration data into validated batches.

    With nothing given, a model that carries a tokenizer is calibrated on the sentences
    shipped with qcompiler; any other model gets no calibration (and no verification).
    """
    if batch_size < 1:
        raise CalibrationError(f"Batch size must be at least 1, not {batch_size}.")
    batch_size = fixed_batch(model) or batch_size
    if calib is None:
        tokenizer_dir = tokenizer or model.metadata_props.get(TOKENIZER_KEY)
        if tokenizer_dir is None:
            return None
        data = calib_data.from_sentences(builtin_sentences(), load_tokenizer(tokenizer_dir), model_inputs(model),
                                         batch_size, max_length, source="built-in calibration sentences")
    elif isinstance(calib, CalibrationData):
        data = calib
    elif isinstance(calib, (str, os.PathLike)):
        path = Path(calib)
        if not path.is_file():
            raise CalibrationError(f"Calibration file '{path}' does not exist.")
        if path.suffix == ".npz":
            data = calib_data.from_npz(path, batch_size)
        else:
            tokenizer_dir = tokenizer or model.metadata_props.get(TOKENIZER_KEY)
            if tokenizer_dir is None:
                raise CalibrationError(
                    f"Text calibration file '{path.name}' needs a tokenizer and the model carries none; "
                    "name one with --tokenizer (tokenizer= in Python): a Hugging Face tokenizer folder, or 'minilm'."
                )
            data = calib_data.from_text(path, load_tokenizer(tokenizer_dir), model_inputs(model), batch_size, max_length)
    else:
        data = calib_data.from_iterable(calib)
    layout = cache_layout(model)
    if layout is not None:
        data = CalibrationData([complete_feeds(layout, batch) for batch in data.batches], data.source)
    calib_data.validate(data, model, what)
    return data
