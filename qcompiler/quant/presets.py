"""Quantization presets: a named pair of weight and activation specs.

Each preset is also a pass name (``w4a8``, ``nvfp4``, ...): the quantize pass with that
preset as its default. The choices follow what the deployments they are named after use:
int8 per-channel symmetric weights everywhere int8 weights appear (what QLinearMatMul and
MatMulInteger kernels take), asymmetric uint4 groups of 128 for 4-bit weight-only (what
MatMulNBits, GPTQ and AWQ checkpoints store), per-channel symmetric int4 and per-token
int4 activations for W4A4 (QuaRot's setting), and the OCP/NVIDIA definitions for MX and NVFP4.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from qcompiler.quant.spec import QuantSpec


@dataclass(frozen=True)
class Scheme:
    """What one linear becomes: its weight spec and its input activation spec (None: kept float)."""

    weight: QuantSpec
    activation: QuantSpec | None

    def describe(self) -> str:
        act = self.activation.describe() if self.activation else "float"
        return f"W {self.weight.describe()} / A {act}"

    def with_options(self, group_size: int | None = None, observer: str | None = None) -> "Scheme":
        """The scheme with a different weight group size (0: per output channel) or activation observer."""
        weight, activation = self.weight, self.activation
        if group_size is not None and weight.format not in ("mxfp8", "mxfp4", "nvfp4"):
            if group_size == 0:
                weight = replace(weight, granularity="channel")
            else:
                weight = replace(weight, granularity="group", group_size=group_size)
        if observer is not None and activation is not None and not activation.dynamic:
            activation = replace(activation, observer=observer)
        return Scheme(weight, activation)


INT8_WEIGHT = QuantSpec("int8", "channel")
UINT4_G128 = QuantSpec("uint4", "group", 128, symmetric=False)

PRESETS: dict[str, tuple[Scheme, str]] = {
    "w8a8": (Scheme(INT8_WEIGHT, QuantSpec("int8", "tensor", symmetric=False)),
             "int8 per-channel weights, int8 per-tensor static activations"),
    "w8a8-dyn": (Scheme(INT8_WEIGHT, QuantSpec("int8", "token", dynamic=True)),
                 "int8 per-channel weights, int8 per-token dynamic activations"),
    "w8a16": (Scheme(INT8_WEIGHT, None), "int8 per-channel weights, float activations"),
    "w4a16": (Scheme(UINT4_G128, None), "4-bit asymmetric weights in groups of 128, float activations"),
    "w4a8": (Scheme(UINT4_G128, QuantSpec("int8", "token", dynamic=True)),
             "4-bit group-128 weights, int8 per-token dynamic activations"),
    "w4a4": (Scheme(QuantSpec("int4", "channel"), QuantSpec("int4", "token", dynamic=True)),
             "int4 per-channel weights, int4 per-token dynamic activations"),
    "fp8": (Scheme(QuantSpec("fp8-e4m3", "channel"), QuantSpec("fp8-e4m3", "tensor")),
            "FP8 E4M3 per-channel weights, FP8 E4M3 per-tensor static activations"),
    "mxfp8": (Scheme(QuantSpec("mxfp8"), QuantSpec("mxfp8", dynamic=True)),
              "MXFP8: E4M3 elements with an E8M0 scale per 32, weights and activations"),
    "mxfp4": (Scheme(QuantSpec("mxfp4"), QuantSpec("mxfp4", dynamic=True)),
              "MXFP4: E2M1 elements with an E8M0 scale per 32, weights and activations"),
    "nvfp4": (Scheme(QuantSpec("nvfp4"), QuantSpec("nvfp4", dynamic=True)),
              "NVFP4: E2M1 elements, an E4M3 scale per 16 and a float32 tensor scale, weights and activations"),
}


def preset_scheme(name: str) -> Scheme:
    try:
        return PRESETS[name][0]
    except KeyError:
        raise ValueError(f"unknown quantization preset '{name}'; known: {', '.join(PRESETS)}") from None
