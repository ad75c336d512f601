"""simplify: constant folding, Identity/Dropout removal, dead-code and duplicate removal.

Exporters leave shape arithmetic on constants, inference-time Dropout and Identity
nodes, and Constant nodes; the onnxscript optimizer's passes fold and remove them and
lift constants to initializers, so later passes see weights as initializers only.
Large weights are never folded (the folder's size limits), so memory stays O(model).

One deliberate difference from ``onnxscript.optimizer.optimize_ir``: its ``x + 0`` /
``x * 1`` no-op rules compare constants with an absolute tolerance of 1e-8, so they
delete the ``+ 1e-12`` epsilon of BERT's decomposed LayerNorm and the LayerNorm can no
longer be recognized. Only the exact Dropout/Identity no-op rules are kept.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript import rewriter
from onnxscript.optimizer import fold_constants_ir
from onnxscript.rewriter.rules import common as rules

from qcompiler.graph import unique_value_name
from qcompiler.pass_api import Pass, PassContext, PassOutcome
from qcompiler.registry import register

# onnxscript's default rewrite rules (0.7.2) without its six arithmetic no-op rules, by public name.
_RULES = [
    rules.dropout_zero_rule, rules.dropout_inference_rule,
    rules.two_reshapes_matmul_reshape_rule, rules.one_reshape_matmul_reshape_rule,
    rules.cast_constant_of_shape_rule, rules.cast_constant_of_shape_without_value_rule,
    rules.collapse_slice_rule, rules.collapse_slice2_rule, rules.materialize_reshape_shape_rule,
    rules.min_min_rule, rules.max_max_rule, rules.min_max_rule, rules.max_min_rule,
    rules.successive_clip_relu_rule, rules.successive_relu_clip_rule, rules.successive_relu_rule,
    rules.successive_clip_rule, rules.cast_cast_rule, rules.no_op_cast_rule, rules.no_op_expand_rule,
    rules.flatten_to_reshape_rule, rules.reshape_reshape_rule, rules.slice_split_rule, rules.no_op_transpose_rule,
    rules.transpose_transpose_rule, rules.unsqueeze_unsqueeze_rule, rules.squeeze_reshape_1d_rule,
    rules.no_op_dynamic_scatter_nd_rule, rules.no_op_static_scatter_nd_rule,
    rules.normalize_pad_format_conv_rule, rules.normalize_pad_format_conv_integer_rule,
    rules.fuse_pad_into_conv_rule, rules.fuse_pad_into_conv_integer_rule,
    rules.fuse_batchnorm_into_conv_rule, rules.fuse_batchnorm_into_conv_transpose_rule,
    rules.fuse_batchnorm_into_gemm_rule,
    rules.remove_optional_bias_from_conv_rule, rules.remove_optional_bias_from_conv_transpose_rule,
    rules.remove_optional_bias_from_qlinear_conv_rule, rules.remove_optional_bias_from_gemm_rule,
]


class _FoldConstants(ir.passes.InPlacePass):
    """onnxscript's public constant folder (with shape inference, default size limits) as a step of the sequence."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, fold_constants_ir(model, onnx_shape_inference=True).modified)


def _pipeline() -> ir.passes.Sequential:
    return ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager(
            [
                _FoldConstants(),
                rewriter.RewritePass(_RULES),
                common.IdentityEliminationPass(),
                common.RemoveUnusedNodesPass(),
                common.RemoveUnusedFunctionsPass(),
                common.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
        common.TopologicalSortPass(),
    )


@register
class Simplify(Pass):
    name = "simplify"
    summary = "Fold constants, drop Identity/Dropout, remove dead nodes and duplicate initializers (onnxscript/onnx_ir passes)."

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        before = len(model.graph)
        names = [value.name for value in model.graph.outputs]
        result = _pipeline()(model)
        _restore_output_names(model.graph, names)
        return PassOutcome(result.modified, {"nodes_removed": before - len(model.graph)})


def _restore_output_names(graph: ir.Graph, names: list[str]) -> None:
    """Give the graph outputs back the names they had: users read outputs by name.

    Two outputs that are Identity copies of one value (``y`` and ``aux``) come out of
    onnx_ir's Identity elimination and output fix as ``aux`` and ``aux_alias_1``.
    """
    outputs = list(graph.outputs)
    if [value.name for value in outputs] == names or any(value in graph.inputs for value in outputs):
        return  # (an output that is a graph input keeps the input's name: feeds are by name)
    wanted = set(names)
    for node in graph:  # an inner value holding a wanted name gives it up
        for value in node.outputs:
            if value.name in wanted and not value.is_graph_output():
                value.name = unique_value_name(graph, f"{value.name}_inner")
    for index, value in enumerate(outputs):
        value.name = f"{names[index]}__restoring_{index}"
    for value, name in zip(outputs, names):
        value.name = name
