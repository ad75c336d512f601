"""The ONNX Runtime backend: onnxruntime's integer kernels (or, in the qdq dialect, standard Q/DQ ops)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir

from qcompiler.backend import Backend, LowerContext, Lowered, register_backend

QDQ_NOTE = ("qdq dialect: onnxruntime fuses blocked 4-bit DequantizeLinear + MatMul into MatMulNBits at load and by "
            "default computes it with int8 activations; set the session config "
            "'session.qdq_matmulnbits_accuracy_level' to 0 for the W4A16 numbers")


@dataclass
class OrtOptions:
    # ort: contrib kernels (MatMulIntegerToFloat, MatMulNBits); qdq: standard ONNX Q/DQ (opset 21) other runtimes read.
    dialect: Literal["ort", "qdq"] = "ort"


@register_backend
class OrtBackend(Backend):
    name = "ort"
    summary = "onnxruntime integer kernels (MatMulIntegerToFloat, MatMulNBits)"
    Options = OrtOptions

    def lower(self, model: ir.Model, ctx: LowerContext) -> Lowered:
        from qcompiler.backends.ort.lower import lower, qdq_dialect

        if self.options.dialect == "qdq":
            return Lowered(model, qdq_dialect(model), notes=[QDQ_NOTE])
        return Lowered(model, lower(model))
