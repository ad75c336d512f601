"""canonical-linear: every linear becomes ``MatMul(x, W)`` (+ ``Add``) with ``W`` an initializer.

Exporters write linears as MatMul+Add (3-D activations) or Gemm (2-D, GPT-2's Conv1D,
``transB=1`` nn.Linear); one form lets every pass find a linear with one matcher:
``Gemm(A, B, C, alpha, beta, transB) = MatMul(A, alpha * B^T?) + beta * C``. The
weight is transposed and scaled offline into a new initializer. A ``MatMul`` that reads
``Transpose(W)`` of a constant (a tied LM head reading the embedding table) gets its own
transposed copy too: the head becomes a linear that later passes may rewrite without
touching the embedding. Where shape inference left a linear's channel axis symbolic (the
legacy exporter's attention context), the weight's size fills it in.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.linears import constant_array
from qcompiler.graph import add_initializer, replace_node
from qcompiler.pass_api import Pass, PassContext, PassOutcome
from qcompiler.registry import register


@register
class CanonicalLinear(Pass):
    name = "canonical-linear"
    summary = "Rewrite Gemm with a constant weight as MatMul (+ Add), the one linear form later passes match."

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        graph = model.graph
        rewritten, kept = 0, []
        for node in list(graph):
            if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
                continue
            reason = self._rewrite(graph, node)
            if reason is None:
                rewritten += 1
            else:
                kept.append(f"{node.name}: {reason}")
        untied = sum(self._untranspose(graph, node) for node in list(graph) if node.op_type == "MatMul")
        dims = sum(_channel_dims_from_weight(node) for node in graph if node.op_type == "MatMul")
        return PassOutcome(bool(rewritten or untied or dims),
                           {"gemm_rewritten": rewritten, "gemm_kept": kept, "transposed_weights_materialized": untied,
                            "channel_dims_from_weights": dims})

    def _untranspose(self, graph: ir.Graph, node: ir.Node) -> bool:
        producer = node.inputs[1].producer() if len(node.inputs) == 2 else None
        if producer is None or producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx"):
            return False
        weight = constant_array(producer.inputs[0])
        perm = producer.attributes.get("perm")
        if weight is None or weight.ndim != 2 or (perm is not None and list(perm.value) != [1, 0]):
            return False
        base = producer.inputs[0].name or node.name
        node.replace_input_with(1, add_initializer(graph, f"{base}_transposed", np.ascontiguousarray(weight.T)))
        return True

    def _rewrite(self, graph: ir.Graph, node: ir.Node) -> str | None:
        attrs = {k: a.value for k, a in node.attributes.items()}
        if attrs.get("transA", 0):
            return "transA=1 is not a linear on the activation"
        weight = constant_array(node.inputs[1])
        if weight is None or weight.ndim != 2:
            return "weight is not a constant matrix"
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        weight = weight.T if attrs.get("transB", 0) else weight
        weight = np.ascontiguousarray(weight * np.asarray(alpha, weight.dtype) if alpha != 1.0 else weight)
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        bias = constant_array(bias_value)
        if bias_value is not None and bias is None and beta != 1.0:
            return "bias is not constant and beta != 1"

        base = node.inputs[1].name or node.name
        weight_value = add_initializer(graph, f"{base}_matmul", weight)
        matmul = ir.node("MatMul", [node.inputs[0], weight_value], name=f"{node.name}_matmul")
        new_nodes = [matmul]
        result = matmul.outputs[0]
        if bias_value is not None:
            if bias is not None and beta != 1.0:
                bias_value = add_initializer(graph, f"{bias_value.name}_scaled", (bias * np.asarray(beta, bias.dtype)))
            add = ir.node("Add", [result, bias_value], name=f"{node.name}_bias")
            new_nodes.append(add)
            result = add.outputs[0]
        replace_node(graph, node, new_nodes, result)
        return None


def _channel_dims_from_weight(node: ir.Node) -> int:
    """Give a linear's input and output the channel counts its weight ``[C_in, C_out]`` implies; how many were unknown.

    Exporters write the attention context as a Reshape to a shape computed at run time,
    so shape inference leaves its last axis symbolic, yet ``x @ W`` only runs with
    ``x.shape[-1] == C_in``. Regions and rotations read channel counts from shapes; this
    is where they come from when inference could not say.
    """
    weight = constant_array(node.inputs[1]) if len(node.inputs) == 2 else None
    if weight is None or weight.ndim != 2 or node.domain not in ("", "ai.onnx"):
        return 0
    filled = 0
    for value, channels in ((node.inputs[0], weight.shape[0]), (node.outputs[0], weight.shape[1])):
        if value.shape is not None and len(value.shape) >= 2 and not isinstance(value.shape[-1], int):
            value.shape = ir.Shape([*value.shape[:-1], int(channels)])
            filled += 1
    return filled
