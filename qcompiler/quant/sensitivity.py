"""Per-weight sensitivity: how far the model's outputs move when only that weight is quantized.

Why: low-bit error is spread unevenly over the linears (on MiniLM at 4 bits one linear of
36 carries a quarter of it), so a few linears kept at 8 bits buy the most fidelity per
byte. HAWQ ranks layers by Hessian trace; here the effect on the outputs is measured:

    sensitivity(W) = sum ||f(x; W -> Q(W)) - f(x)||^2 / sum ||f(x)||^2

over the calibration batches' floating outputs at real (unpadded) tokens. One
onnxruntime session serves every weight: the weights are made overridable inputs while
the session is built, and each trial feeds one replacement.

Static activation ranges are scored the same way (`activation_sensitivity`): on a copy of
the model, each linear's input passes through ``x + g (Q(x) - x)`` with ``g`` a scalar
graph input, 0 everywhere but in the trial that measures that linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler.calibration.data import Feeds, real_tokens, token_mask
from qcompiler.graph import insert_after_producer
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
    inputs = {i.name for i in session.get_inputs()} - set(replacements)
    trials = {name: {name: np.asarray(array, np.float32)} for name, array in replacements.items()}
    return _score(session, [{k: v for k, v in feeds.items() if k in inputs} for feeds in batches], trials, advance)


def activation_sensitivity(model: ir.Model, quantizers: Mapping[int, Callable[[ir.Graph, ir.Value], ir.Value]],
                           batches: Sequence[Feeds], advance: Callable[[], None] = lambda: None) -> dict[int, float]:
    """Per node index of ``model.graph``, the relative squared output error with only that node's input quantized.

    ``quantizers[i](graph, x)`` builds the quantize-dequantize of node ``i``'s input 0 in
    ``graph`` (a copy: ``model`` is left as it is) and returns its output.
    """
    copy = ir.from_proto(ir.to_proto(model))  # node order survives the round trip: index i is the same node
    graph, nodes = copy.graph, list(copy.graph)
    gates: dict[int, str] = {}
    for index, quantize in quantizers.items():
        node = nodes[index]
        source = node.inputs[0]
        quantized = quantize(graph, source)
        gate = ir.Value(name=f"sensitivity_gate_{index}", shape=ir.Shape([]), type=source.type)
        graph.inputs.append(gate)
        error = ir.node("Sub", [quantized, source])
        gated = ir.node("Mul", [error.outputs[0], gate])
        mixed = ir.node("Add", [source, gated.outputs[0]])
        insert_after_producer(graph, quantized, [error, gated, mixed])
        mixed.outputs[0].shape, mixed.outputs[0].type = source.shape, source.type
        node.replace_input_with(0, mixed.outputs[0])
        gates[index] = gate.name
    session = make_session(copy)
    dtype = {i.name: i.type for i in session.get_inputs()}
    closed = {name: np.zeros((), np.float16 if "float16" in dtype[name] else np.float32) for name in gates.values()}
    trials = {index: {name: np.ones((), closed[name].dtype)} for index, name in gates.items()}
    feeds_list = [{**{k: v for k, v in feeds.items() if k in dtype}, **closed} for feeds in batches]
    return _score(session, feeds_list, trials, advance)


def _score(session, feeds_list: list[Feeds], trials: Mapping, advance: Callable[[], None]) -> dict:
    """Relative squared change of the floating outputs when each trial's feeds override the base feeds."""
    floating = [i for i, output in enumerate(session.get_outputs()) if "float" in output.type]

    def outputs(feeds: Feeds) -> list[np.ndarray]:
        results = session.run(None, feeds)
        mask = token_mask(feeds)
        return [real_tokens(np.asarray(results[i], np.float64), mask) for i in floating]

    reference = [outputs(feeds) for feeds in feeds_list]
    energy = sum(float(np.sum(np.square(o))) for batch in reference for o in batch)
    scores = {}
    for key, override in trials.items():
        error = 0.0
        for feeds, expected in zip(feeds_list, reference):
            got = outputs({**feeds, **override})
            error += sum(float(np.sum(np.square(g - e))) for g, e in zip(got, expected))
        scores[key] = error / energy if energy > 0 else error
        advance()
    return scores
