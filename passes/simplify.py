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
from onnxscript.optimizer import _constant_folding
from onnxscript.rewriter.rules.common import _no_op

from qcompiler.registry import Pass, PassOutcome, register

_ARITHMETIC_NO_OPS = {id(rule) for rule in _no_op.rules} - {id(_no_op.dropout_zero_rule), id(_no_op.dropout_inference_rule)}
_RULES = [rule for rule in rewriter._DEFAULT_REWRITE_RULES if id(rule) not in _ARITHMETIC_NO_OPS]


def _pipeline() -> ir.passes.Sequential:
    return ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                                    output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
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

    def run(self, model: ir.Model, ctx) -> PassOutcome:
        before = len(model.graph)
        result = _pipeline()(model)
        return PassOutcome(result.modified, {"nodes_removed": before - len(model.graph)})
