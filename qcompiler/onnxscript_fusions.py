"""onnxscript's LayerNorm and RMSNorm fusion rules, which onnxscript does not export publicly.

Checked against onnxscript 0.7.2: the rules live in the private modules
``onnxscript.rewriter.rules.fusion._layer_norm`` and ``._rms_normalization`` (the public
``ort_fusions`` fuse to com.microsoft ops instead of the standard LayerNormalization and
RMSNormalization that qcompiler's regions start from). This module is the only place
qcompiler imports them; ``tests/test_private_apis.py`` fails, naming the module, if an
onnxscript release moves them.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.rules.fusion import _layer_norm, _rms_normalization


def fuse_layer_normalization(model: ir.Model) -> int:
    """Fuse every decomposed LayerNorm into LayerNormalization (opset 17); returns how many."""
    return _layer_norm.fuse_layer_normalization(model)


def fuse_rms_normalization(model: ir.Model) -> int:
    """Fuse every decomposed RMSNorm into RMSNormalization (opset 23); returns how many."""
    return _rms_normalization.fuse_rms_normalization(model)
