"""Compare model outputs: the numbers behind "this pass preserved the function"."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def compare_outputs(reference: Sequence[Mapping[str, np.ndarray]],
                    candidate: Sequence[Mapping[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Per output over all batches: max abs error, relative error, cosine similarity.

    Relative error is ``max |a - b| / max |a|``: the worst deviation measured against the
    output's own scale, so it reads the same for logits and for normalized embeddings.
    Cosine is over the flattened output.
    """
    result: dict[str, dict[str, float]] = {}
    for name in reference[0]:
        ref = np.concatenate([np.asarray(b[name], np.float64).ravel() for b in reference])
        new = np.concatenate([np.asarray(b[name], np.float64).ravel() for b in candidate])
        diff = np.abs(ref - new)
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        norms = float(np.linalg.norm(ref) * np.linalg.norm(new))
        cosine = float(ref @ new / norms) if norms > 0 else float(np.array_equal(ref, new))
        result[name] = {
            "max_abs_error": max_abs,
            "relative_error": max_abs / scale if scale > 0 else max_abs,
            "cosine": cosine,
        }
    return result


def worst(errors: Mapping[str, Mapping[str, float]]) -> tuple[str, dict[str, float]]:
    """The output with the largest relative error."""
    name = max(errors, key=lambda n: errors[n]["relative_error"])
    return name, dict(errors[name])
