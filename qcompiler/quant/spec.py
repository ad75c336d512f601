"""QuantSpec: how one tensor is quantized, and the arithmetic that does it.

A spec names a format (an element format such as ``int4`` or ``fp8-e4m3``, or a scaled
block format: ``mxfp8``/``mxfp4`` with an E8M0 scale per 32, ``nvfp4`` with an E4M3
scale per 16 times one float32 tensor scale), a granularity, symmetry and whether
activation ranges are static (observed at calibration) or dynamic (computed at run time).

Scales use ONNX's DequantizeLinear layout, so what the arithmetic computes is what the
graph stores: per-tensor a scalar, per-axis a 1-D vector along ``axis``, blocked the
tensor's shape with ``axis`` divided into blocks. For a MatMul weight ``W [K, N]``:

    channel  -> axis 1            (one scale per output channel)
    group    -> axis 0, block g   (g consecutive input rows per output channel)
    ic-group -> axis 1, block g   (AdaDim per-input-channel: g output columns per input row)

and for an activation ``x [..., K]``: tensor, token (block = K on the last axis) or group
(block g on the last axis).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import ml_dtypes
import numpy as np

from qcompiler.quant.formats import ElementFormat, element_format, round_e8m0

Granularity = Literal["tensor", "channel", "group", "ic-group", "token"]
Role = Literal["weight", "activation"]
BLOCK_FORMATS = {"mxfp8": ("fp8-e4m3", 32), "mxfp4": ("fp4-e2m1", 32), "nvfp4": ("fp4-e2m1", 16)}
FORMAT_ALIASES = {"fp8": "fp8-e4m3", "fp8-e4m3fn": "fp8-e4m3", "fp4": "fp4-e2m1"}
OBSERVERS = ("minmax", "percentile", "mse")
E4M3_MAX = 448.0


@dataclass(frozen=True)
class QuantSpec:
    """How one weight or activation is quantized."""

    format: str
    granularity: Granularity = "tensor"
    group_size: int = 128
    symmetric: bool = True
    dynamic: bool = False
    observer: str = "minmax"

    def __post_init__(self) -> None:
        fmt = FORMAT_ALIASES.get(self.format, self.format)
        object.__setattr__(self, "format", fmt)
        if fmt in BLOCK_FORMATS:
            object.__setattr__(self, "granularity", "group")
            object.__setattr__(self, "group_size", BLOCK_FORMATS[fmt][1])
        self.element  # validates the name
        if self.granularity not in ("tensor", "channel", "group", "ic-group", "token"):
            raise ValueError(f"unknown granularity '{self.granularity}'")
        if self.group_size < 1:
            raise ValueError(f"group size must be positive, not {self.group_size}")
        if not self.symmetric and self.element.kind == "float":
            raise ValueError(f"format {fmt} is symmetric only")
        if self.granularity == "token" and not self.dynamic:
            raise ValueError("per-token ranges exist only at run time; a token granularity must be dynamic")
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer '{self.observer}'; known: {', '.join(OBSERVERS)}")

    @property
    def element(self) -> ElementFormat:
        return element_format(BLOCK_FORMATS[self.format][0] if self.format in BLOCK_FORMATS else self.format)

    @property
    def scale_kind(self) -> Literal["float32", "e8m0", "e4m3+tensor"]:
        """How scales are stored: float32, a power of two (MX), or E4M3 blocks times a tensor scale (NVFP4)."""
        if self.format.startswith("mx"):
            return "e8m0"
        return "e4m3+tensor" if self.format == "nvfp4" else "float32"

    def layout(self, role: Role, shape: tuple[int, ...]) -> tuple[int | None, int]:
        """``(axis, block)`` of the scale in DequantizeLinear terms (block 0: per-axis; axis None: per-tensor)."""
        if self.granularity == "tensor":
            return None, 0
        if role == "weight":
            if self.granularity == "channel":
                return 1, 0
            if self.granularity == "group":
                return 0, self.group_size
            if self.granularity == "ic-group":
                return 1, self.group_size
            raise ValueError("weights have no per-token granularity")
        last = len(shape) - 1
        if self.granularity == "token":
            return last, int(shape[-1])
        if self.granularity == "group":
            return last, self.group_size
        raise ValueError(f"activations cannot be quantized per {self.granularity}; use tensor, token or group")

    def describe(self) -> str:
        """Short human form: ``int4 g128 asym``, ``int8 token dyn``, ``nvfp4``."""
        if self.format in BLOCK_FORMATS:
            return self.format + (" dyn" if self.dynamic else "")
        parts = [self.format]
        parts.append({"group": f"g{self.group_size}", "ic-group": f"ic-g{self.group_size}"}.get(self.granularity,
                                                                                               self.granularity))
        parts.append("sym" if self.symmetric else "asym")
        if self.dynamic:
            parts.append("dyn")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantizedTensor:
    """Grid values with scales (and zero points) in DequantizeLinear layout."""

    values: np.ndarray  # grid values as float32 (integers or minifloat values)
    scale: np.ndarray  # float32; the effective scale (block scale x tensor scale for NVFP4)
    zero_point: np.ndarray | None
    axis: int | None
    block: int
    spec: QuantSpec
    tensor_scale: float | None = None  # NVFP4's second level

    def dequantize(self) -> np.ndarray:
        scale = broadcast(self.scale, self.values.shape, self.axis, self.block)
        if self.zero_point is None:
            return (self.values * scale).astype(np.float32)
        zero = broadcast(self.zero_point, self.values.shape, self.axis, self.block)
        return ((self.values - zero) * scale).astype(np.float32)

    def codes(self) -> np.ndarray:
        """Values in the element format's dtype (what a kernel stores)."""
        return self.spec.element.encode(self.values)


def reduce(x: np.ndarray, axis: int | None, block: int, ufunc: np.ufunc) -> np.ndarray:
    """Reduce ``x`` to the scale layout of ``(axis, block)`` with ``ufunc`` (maximum or minimum)."""
    if axis is None:
        return np.asarray(ufunc.reduce(x, axis=None), np.float32)
    if block == 0:
        others = tuple(i for i in range(x.ndim) if i != axis)
        return ufunc.reduce(x, axis=others).astype(np.float32)
    starts = np.arange(0, x.shape[axis], block)
    return ufunc.reduceat(x, starts, axis=axis).astype(np.float32)


def broadcast(scale: np.ndarray, shape: tuple[int, ...], axis: int | None, block: int) -> np.ndarray:
    """Expand a scale-layout array to ``shape`` (the inverse view of `reduce`)."""
    scale = np.asarray(scale)
    if axis is None:
        return scale
    if block == 0:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return scale.reshape(view)
    return np.take(np.repeat(scale, block, axis=axis), np.arange(shape[axis]), axis=axis)


def quantize(x: np.ndarray, spec: QuantSpec, role: Role, clip: float | np.ndarray = 1.0,
             bounds: tuple[np.ndarray, np.ndarray] | None = None) -> QuantizedTensor:
    """Quantize ``x`` under ``spec`` with round-to-nearest.

    ``bounds`` gives the range (``lo, hi`` in scale layout) when it comes from an observer
    rather than from ``x`` itself; ``clip`` shrinks the range (a scalar, or one ratio per
    scale entry for clipping searches).
    """
    x = np.asarray(x, np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot quantize a tensor holding NaN or Inf")
    axis, block = spec.layout(role, x.shape)
    if bounds is None:
        lo, hi = reduce(x, axis, block, np.minimum), reduce(x, axis, block, np.maximum)
    else:
        lo, hi = (np.asarray(b, np.float32) for b in bounds)
    lo, hi = lo * clip, hi * clip
    fmt = spec.element
    tensor_scale = None
    zero_point = None
    if spec.format == "nvfp4":
        tensor_max = float(np.max(np.abs(x))) if x.size else 0.0
        tensor_scale = tensor_max / (fmt.max_value * E4M3_MAX) if tensor_max > 0 else 1.0
        amax = np.maximum(np.abs(lo), np.abs(hi))
        block_scale = np.clip(amax / fmt.max_value / tensor_scale, 0, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
        scale = block_scale.astype(np.float32) * np.float32(tensor_scale)
    elif spec.scale_kind == "e8m0":
        amax = np.maximum(np.abs(lo), np.abs(hi))
        scale = round_e8m0(np.where(amax > 0, amax, 1.0) / 2.0**fmt.exponent_max)
    elif spec.symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        scale = _normal(amax / fmt.max_value)
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        scale = _normal((hi - lo) / (fmt.qmax - fmt.qmin))
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(np.round(fmt.qmin - lo / safe), fmt.qmin, fmt.qmax).astype(np.float32)
    scale = np.where((scale > 0) & np.isfinite(scale), scale, 1.0).astype(np.float32)
    full_scale = broadcast(scale, x.shape, axis, block)
    if zero_point is None:
        values = fmt.round(x / full_scale)
    else:
        values = fmt.round(x / full_scale + broadcast(zero_point, x.shape, axis, block))
    return QuantizedTensor(values, scale, zero_point, axis, block, spec, tensor_scale)


def _normal(scale: np.ndarray) -> np.ndarray:
    """Positive scales raised to float32's smallest normal: a subnormal scale has too few bits to divide by.

    A tensor whose range is below ``max_value * 1.2e-38`` would otherwise get a scale that
    rounds, and its largest value would land outside the format's range.
    """
    return np.where(scale > 0, np.maximum(scale, np.finfo(np.float32).tiny), scale)


def fake_quant(x: np.ndarray, spec: QuantSpec, role: Role, clip: float | np.ndarray = 1.0) -> np.ndarray:
    """Quantize then dequantize: the values the deployed model will compute with."""
    return quantize(x, spec, role, clip).dequantize()


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    reference = np.asarray(reference, np.float64)
    noise = float(np.sum(np.square(reference - np.asarray(approximation, np.float64))))
    signal = float(np.sum(np.square(reference)))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")
