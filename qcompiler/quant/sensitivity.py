"""Per-weight sensitivity: how far the model's outputs move when only that weight is quantized.

Why: low-bit error is spread unevenly over the linears (on MiniLM at 4 bits one linear of
36 carries a quarter of it), so a few linears kept at 8 bits buy the most fidelity per
byte. HAWQ ranks layers by Hessian trace; here the effect on the outputs is measured:

    sensitivity(W) = sum ||f(x; W -> Q(W)) - f(x)||^2 / sum ||f(x)||^2

over the calibration batches' floating outputs at real (unpadded) tokens. One
onnxruntime session serves every weight: the weights are made overridable inputs while
the session is built, and each trial feeds one replacement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler.calibration.data import Feeds, real_tokens, token_mask
from qcompiler.runtime import make_session


@dataclass(frozen=True)
class SensitivityRow:
    """One linear of quantize's fallback ranking: what the manifest and report.md list."""

    linear: str  # module path
    rtn_output_error: float  # relative squared output error with only this weight rounded to nearest
    parameters: int
    preset: str  # the preset the linear ended with (the fallback one when it was chosen)


def output_sensitivity(model: ir.Model, replacements: Mapping[str, np.ndarray], batches: Sequence[Feeds],
                       advance: Callable[[], None] = lambda: None) -> dict[str, float]:
    """For each initializer name, the relative squared output error with only it replaced (``advance`` after each)."""
    graph = model.graph
    overridable = [graph.initializers[name] for name in replacements]
    graph.inputs.extend(overridable)
    try:
        session = make_session(model)
    finally:
        for value in overridable:
            graph.inputs.remove(value)
    floating = [i for i, output in enumerate(session.get_outputs()) if "float" in output.type]

    def outputs(feeds: Feeds) -> list[np.ndarray]:
        results = session.run(None, feeds)
        mask = token_mask(feeds)
        return [real_tokens(np.asarray(results[i], np.float64), mask) for i in floating]

    inputs = {i.name for i in session.get_inputs()} - set(replacements)
    feeds_list = [{k: v for k, v in feeds.items() if k in inputs} for feeds in batches]
    reference = [outputs(feeds) for feeds in feeds_list]
    energy = sum(float(np.sum(np.square(o))) for batch in reference for o in batch)
    scores = {}
    for name, array in replacements.items():
        error = 0.0
        for feeds, expected in zip(feeds_list, reference):
            got = outputs({**feeds, name: np.asarray(array, np.float32)})
            error += sum(float(np.sum(np.square(g - e))) for g, e in zip(got, expected))
        scores[name] = error / energy if energy > 0 else error
        advance()
    return scores
