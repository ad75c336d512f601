"""convert-opset: bring the default-domain opset to the version qcompiler works in.

Exporters write anything from opset 11 to 23; the canonical form is opset 23, where
LayerNormalization (17), Gelu (20), blocked and 4-bit QDQ (21) and RMSNormalization (23)
are all standard ops. The onnxscript version converter rewrites each node whose
signature changed (ReduceMean axes attribute to input, for example).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnxscript import version_converter

from qcompiler.errors import QCompilerError
from qcompiler.options import option
from qcompiler.runtime import INLINE_LIMIT_BYTES, initializer_bytes
from qcompiler.pass_api import Pass, PassContext, PassOutcome
from qcompiler.registry import register

CANONICAL_OPSET = 23
OLDEST_SUPPORTED_OPSET = 11
ONNXSCRIPT_OLDEST_OPSET = 18


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


@dataclass
class ConvertOpsetOptions:
    version: int = option(CANONICAL_OPSET, "the opset the model is converted to")


@register
class ConvertOpset(Pass):
    name = "convert-opset"
    summary = "Convert the default-domain opset to one version (23 by default) with the onnxscript version converter."
    Options = ConvertOpsetOptions

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        source = default_opset(model)
        target = self.options.version
        if source == target:
            return PassOutcome(False, {"opset": target})
        if source < OLDEST_SUPPORTED_OPSET:
            raise QCompilerError(f"The model uses opset {source}; qcompiler supports opset {OLDEST_SUPPORTED_OPSET} and later.")
        if not OLDEST_SUPPORTED_OPSET <= target <= CANONICAL_OPSET:
            raise QCompilerError(f"convert-opset version must be between {OLDEST_SUPPORTED_OPSET} and {CANONICAL_OPSET}, not {target}.")
        if target < source:
            raise QCompilerError(f"convert-opset converts to newer opsets only: the model is at opset {source}, "
                                 f"so version={target} would need a downgrade, which the version converter does not do.")
        # onnxscript's converter handles opset 18 onwards; older models go through the
        # onnx C API, which needs the whole model as one protobuf (so under 2 GB).
        fallback = source < ONNXSCRIPT_OLDEST_OPSET
        if fallback and initializer_bytes(model) > INLINE_LIMIT_BYTES:
            raise QCompilerError(
                f"The model uses opset {source} and is too large to convert in one piece; "
                f"export it at opset {ONNXSCRIPT_OLDEST_OPSET} or later."
            )
        try:
            version_converter.convert_version(model, target, fallback=fallback)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
            raise QCompilerError(f"Could not convert the model from opset {source} to {target} ({reason}).") from exc
        if default_opset(model) != target:
            raise QCompilerError(f"Could not convert the model from opset {source} to {target}.")
        return PassOutcome(True, {"from_opset": source, "opset": target})
