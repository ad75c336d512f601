"""The ONNX Runtime backend: onnxruntime's integer kernels (or, in the qdq dialect, standard Q/DQ ops)."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx_ir as ir

from qcompiler.backend import Backend, LowerContext, Lowered, register_backend
from qcompiler.decoding import cache_layout
from qcompiler.genai_config import genai_files
from qcompiler.online_rotation import balance_rotations
from qcompiler.options import option

QDQ_NOTE = ("qdq dialect: onnxruntime fuses blocked 4-bit DequantizeLinear + MatMul into MatMulNBits at load and by "
            "default computes it with int8 activations; set the session config "
            "'session.qdq_matmulnbits_accuracy_level' to 0 for the W4A16 numbers")


@dataclass
class OrtOptions:
    dialect: Literal["ort", "qdq"] = option("ort", "ort: contrib kernels (MatMulIntegerToFloat, MatMulNBits); qdq: "
                                                   "standard ONNX Q/DQ (opset 21) that other runtimes read")
    int8: Literal["auto", "u8s8", "u8u8"] = option("auto", "int8 GEMM layout; auto: u8s8 where this CPU runs it "
                                                         "without saturating (VNNI), else u8u8")


def saturation_free_layout() -> str:
    """``u8s8`` on CPUs whose u8 x s8 products accumulate in 32 bits (x86 with VNNI, non-x86), else ``u8u8``.

    Without VNNI, x86 kernels add pairs of u8 x s8 products in saturating 16-bit lanes.
    Where the flags cannot be read, ``u8u8``: slower at worst, never wrong.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return "u8s8"
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "u8u8"
    return "u8s8" if re.search(r"\b(avx512_vnni|avx_vnni)\b", flags) else "u8u8"


@register_backend
class OrtBackend(Backend):
    name = "ort"
    summary = "onnxruntime integer kernels (MatMulIntegerToFloat, MatMulNBits)"
    Options = OrtOptions

    def lower(self, model: ir.Model, ctx: LowerContext) -> Lowered:
        from qcompiler.backends.ort.lower import lower, qdq_dialect

        balance_rotations(model)  # onnxruntime multiplies both factors densely: balanced sizes cost least
        int8 = saturation_free_layout() if self.options.int8 == "auto" else self.options.int8
        lowering = qdq_dialect(model, int8) if self.options.dialect == "qdq" else lower(model, int8)
        notes = [QDQ_NOTE] if self.options.dialect == "qdq" else []
        if int8 == "u8u8" and any("MatMulInteger" in kernel for kernel in lowering.kernels.values()):
            notes.append("int8 GEMMs use the u8u8 layout: on x86 CPUs without VNNI, u8s8 products saturate in "
                         "16-bit lanes (int8=u8s8 forces the faster layout for a VNNI deployment target)")
        layout = cache_layout(model)
        if layout is not None and layout.quantized:
            notes.append("no genai_config.json: onnxruntime-genai allocates a float KV cache of its own and cannot "
                         "feed a quantized one; generate with qcompile generate")
        # A causal LM's artifact is also an onnxruntime-genai model folder.
        return Lowered(model, lowering, files=genai_files(model), manifest={"ort": {"int8": int8}}, notes=notes)
