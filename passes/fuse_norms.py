"""fuse-norms: decomposed LayerNorm and RMSNorm subgraphs become single nodes.

The legacy exporter writes LayerNorm as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add
and Hugging Face RMSNorm exports as Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul. Regions
start at norm producers, so these must be one `LayerNormalization` (opset 17) or
`RMSNormalization` (opset 23) node whatever the exporter. The pattern rules are
onnxscript's own fusion rules (`qcompiler.onnxscript_fusions`), applied after default attributes
are written out.
"""

from __future__ import annotations

import onnx_ir as ir

from qcompiler.onnxscript_fusions import fuse_layer_normalization, fuse_rms_normalization
from qcompiler.pass_api import Pass, PassContext, PassOutcome
from qcompiler.registry import register


@register
class FuseNorms(Pass):
    name = "fuse-norms"
    summary = "Fuse decomposed LayerNorm and RMSNorm subgraphs into LayerNormalization / RMSNormalization nodes."

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        # The rules match attributes literally; spell out defaults such as keepdims=1.
        ir.passes.common.AddDefaultAttributesPass()(model)
        layer_norms = fuse_layer_normalization(model)
        rms_norms = fuse_rms_normalization(model)
        return PassOutcome(bool(layer_norms or rms_norms), {"layer_norm": layer_norms, "rms_norm": rms_norms})
