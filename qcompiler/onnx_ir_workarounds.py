"""Workarounds for onnx_ir behaviour that costs qcompiler memory; the one module that touches its private state.

onnx_ir 1.1's ``GraphInputs`` counts how often each value is a graph input in a
``Counter`` and never deletes a key whose count falls to zero, so every value that was
once a graph input stays referenced, tensor and all, for the life of the graph. The torch
exporter makes every weight a graph input before lifting it to an initializer (and its
optimizer then folds many into new constants), so a captured Hugging Face model keeps the
original torch parameters alive however the passes rewrite the weights: measured on a
random Llama (8 layers, hidden 1024, 0.57 GiB of fp32 weights), 0.44 GiB still held after
`rotate` had replaced every weight. ``tests/test_private_apis.py`` checks that the
private name still exists and still leaks, so the day onnx_ir fixes it this module goes.
"""

from __future__ import annotations

import onnx_ir as ir


def release_former_inputs(graph: ir.Graph) -> int:
    """Forget the values ``graph`` keeps only because they were once its inputs; the number released."""
    counter = getattr(graph.inputs, "_ref_counter", None)
    if counter is None:
        return 0
    stale = [value for value, count in counter.items() if count <= 0]
    for value in stale:
        del counter[value]
        if not value.is_initializer() and not value.uses():
            value.const_value = None
    return len(stale)
