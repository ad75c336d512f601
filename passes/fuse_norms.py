"""fuse-norms: decomposed LayerNorm and RMSNorm subgraphs become single nodes.

The legacy exporter writes LayerNorm as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add
and Hugging Face RMSNorm exports as Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul. Regions
start at norm producers, so these must be one `LayerNormalization` (opset 17) or
`RMSNormalization` (opset 23) node whatever the exporter. The pattern rules are
onnxscript's own fusion rules, applied after default attributes are written out.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.rules.fusion import _layer_norm, _rms_normalization

from qcompiler.registry import Pass, PassOutcome, register


@register
class FuseNorms(Pass):
    name = "fuse-norms"
    summary = "Fuse decomposed LayerNorm and RMSNorm subgraphs into LayerNormalization / RMSNormalization nodes."

    def run(self, model: ir.Model, ctx) -> PassOutcome:
        # The rules match attributes literally; spell out defaults such as keepdims=1.
        ir.passes.common.AddDefaultAttributesPass()(model)
        layer_norms = _layer_norm.fuse_layer_normalization(model)
        rms_norms = _rms_normalization.fuse_rms_normalization(model)
        return PassOutcome(bool(layer_norms or rms_norms), {"layer_norm": layer_norms, "rms_norm": rms_norms})
