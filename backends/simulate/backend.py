"""The simulate backend: the model stays in the quantize pass's Q/DQ form (float ops), for measuring fidelity."""

from __future__ import annotations

import onnx_ir as ir

from qcompiler.backend import Backend, LowerContext, Lowered, Lowering, register_backend
from qcompiler.genai_config import genai_files
from qcompiler.quant.annotation import annotated_layers

SIMULATED = "simulate form (QuantizeLinear/DequantizeLinear and float ops)"


@register_backend
class SimulateBackend(Backend):
    name = "simulate"
    summary = "the Q/DQ form: QuantizeLinear/DequantizeLinear and float ops, which every ONNX runtime runs"

    def lower(self, model: ir.Model, ctx: LowerContext) -> Lowered:
        return Lowered(model, Lowering(simulated={a.layer: SIMULATED for _, a in annotated_layers(model)}),
                       files=genai_files(model))
