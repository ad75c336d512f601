"""fuse-norms: decomposed LayerNorm and RMSNorm subgraphs become single nodes.

The legacy exporter writes LayerNorm as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add
and Hugging Face RMSNorm exports as Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul (the legacy
exporter: Div(1, Sqrt) for the Reciprocal, with Casts around it, which are read as Reciprocal). Regions
start at norm producers, so these must be one `LayerNormalization` (opset 17) or
`RMSNormalization` (opset 23) node whatever the exporter. The pattern rules are
onnxscript's own fusion rules (`qcompiler.onnxscript_fusions`), applied after default attributes
are written out.
"""

from __future__ import annotations

import onnx_ir as ir

from qcompiler.analysis.linears import constant_array
from qcompiler.graph import replace_node
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
        reciprocals = _divisions_of_one_as_reciprocals(model.graph)
        layer_norms = fuse_layer_normalization(model)
        rms_norms = fuse_rms_normalization(model)
        return PassOutcome(bool(layer_norms or rms_norms or reciprocals),
                           {"layer_norm": layer_norms, "rms_norm": rms_norms, "reciprocals": reciprocals})


def _divisions_of_one_as_reciprocals(graph: ir.Graph) -> int:
    """``Div(1, x)`` becomes ``Reciprocal(x)``; returns how many.

    The legacy exporter writes Hugging Face's ``x * torch.rsqrt(var + eps)`` as
    ``Div(1, Sqrt(.))``; onnxscript's RMSNorm rule matches ``Reciprocal(Sqrt(.))``.
    """
    count = 0
    for node in list(graph):
        one = constant_array(node.inputs[0]) if node.op_type == "Div" and node.domain in ("", "ai.onnx") else None
        divisor = node.inputs[1] if one is not None else None
        if one is None or one.size != 1 or float(one.reshape(-1)[0]) != 1.0 or divisor.shape is None:
            continue
        if one.ndim > len(divisor.shape):  # the Div would broadcast the divisor up
            continue
        replace_node(graph, node, ir.node("Reciprocal", [divisor], name=node.name))
        count += 1
    return count
