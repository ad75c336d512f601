"""Element formats: the numbers a quantized tensor stores, their rounding and their packing.

An element format is a grid of representable values: integers ``[qmin, qmax]`` or a
minifloat (e4m3fn, e5m2, e2m1) whose rounding is ml_dtypes' round-to-nearest-even.
Values beyond the grid saturate to its largest magnitude, which is what a quantizer wants
(ml_dtypes itself would give NaN or inf for fn/fnuz formats). Sub-byte codes pack as
ONNX packs them: the first element in the lowest bits of each byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class ElementFormat:
    """One storage format: its grid, its numpy/ml_dtypes dtype and its ONNX type."""

    name: str
    kind: Literal["int", "float"]
    bits: int
    signed: bool
    dtype: np.dtype
    onnx_type: ir.DataType

    @property
    def qmin(self) -> float:
        """Smallest representable value (most negative)."""
        if self.kind == "float":
            return -self.max_value
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> float:
        if self.kind == "float":
            return self.max_value
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def max_value(self) -> float:
        """Largest representable magnitude (what an absmax maps to)."""
        if self.kind == "float":
            return float(ml_dtypes.finfo(self.dtype).max)
        return float(self.qmax)

    @property
    def exponent_max(self) -> int:
        """``floor(log2(max_value))``: the element exponent an MX scale aligns the block maximum to."""
        return int(np.floor(np.log2(self.max_value)))

    def round(self, x: np.ndarray) -> np.ndarray:
        """Nearest grid value of ``x`` (already divided by its scale), saturating; float32 result."""
        x = np.asarray(x, np.float32)
        if self.kind == "int":
            return np.clip(np.round(x), self.qmin, self.qmax).astype(np.float32)
        clipped = np.clip(np.nan_to_num(x, nan=0.0), -self.max_value, self.max_value)
        return clipped.astype(self.dtype).astype(np.float32)

    def encode(self, grid_values: np.ndarray) -> np.ndarray:
        """Grid values (output of `round`) as an array of this format's dtype."""
        return np.asarray(grid_values).astype(self.dtype)


def _int(name: str, bits: int, signed: bool, dtype, onnx_type: ir.DataType) -> ElementFormat:
    return ElementFormat(name, "int", bits, signed, np.dtype(dtype), onnx_type)


def _float(name: str, bits: int, dtype, onnx_type: ir.DataType) -> ElementFormat:
    return ElementFormat(name, "float", bits, True, np.dtype(dtype), onnx_type)


ELEMENT_FORMATS: dict[str, ElementFormat] = {
    f.name: f
    for f in (
        _int("int8", 8, True, np.int8, ir.DataType.INT8),
        _int("uint8", 8, False, np.uint8, ir.DataType.UINT8),
        _int("int4", 4, True, ml_dtypes.int4, ir.DataType.INT4),
        _int("uint4", 4, False, ml_dtypes.uint4, ir.DataType.UINT4),
        _int("int2", 2, True, ml_dtypes.int2, ir.DataType.INT2),
        _int("uint2", 2, False, ml_dtypes.uint2, ir.DataType.UINT2),
        _float("fp8-e4m3", 8, ml_dtypes.float8_e4m3fn, ir.DataType.FLOAT8E4M3FN),
        _float("fp8-e5m2", 8, ml_dtypes.float8_e5m2, ir.DataType.FLOAT8E5M2),
        _float("fp4-e2m1", 4, ml_dtypes.float4_e2m1fn, ir.DataType.FLOAT4E2M1),
    )
}


def element_format(name: str) -> ElementFormat:
    try:
        return ELEMENT_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown element format '{name}'; known: {', '.join(ELEMENT_FORMATS)}") from None


def round_e8m0(scale: np.ndarray) -> np.ndarray:
    """Power-of-two scales representable in E8M0 (2^-127 .. 2^127), rounding the exponent down.

    OCP MX rounds the shared exponent down (``floor(log2 amax) - emax_elem``), so the
    block maximum may saturate but never overflows the element range by more than one binade.
    """
    exponent = np.floor(np.log2(np.maximum(scale, 2.0**-127)))
    return np.exp2(np.clip(exponent, -127, 127)).astype(np.float32)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack sub-byte codes (their low ``bits`` bits) into uint8, first element lowest, as ONNX does."""
    if bits not in (2, 4):
        raise ValueError(f"packing is defined for 2- and 4-bit codes, not {bits}")
    per_byte = 8 // bits
    raw = np.asarray(codes).ravel().view(np.uint8) if np.asarray(codes).dtype.itemsize == 1 else \
        np.asarray(codes).ravel().astype(np.uint8)
    raw = raw & ((1 << bits) - 1)
    padded = np.zeros(-(-raw.size // per_byte) * per_byte, np.uint8)
    padded[: raw.size] = raw
    lanes = padded.reshape(-1, per_byte)
    packed = np.zeros(lanes.shape[0], np.uint8)
    for lane in range(per_byte):
        packed |= lanes[:, lane] << (lane * bits)
    return packed


def unpack(packed: np.ndarray, fmt: ElementFormat, count: int) -> np.ndarray:
    """Inverse of `pack`: ``count`` codes of ``fmt`` (sign-extended for signed integers)."""
    bits = fmt.bits
    per_byte = 8 // bits
    packed = np.asarray(packed, np.uint8)
    lanes = np.stack([(packed >> (lane * bits)) & ((1 << bits) - 1) for lane in range(per_byte)], axis=1)
    raw = lanes.ravel()[:count].astype(np.uint8)
    if fmt.kind == "float":
        return raw.view(fmt.dtype)
    values = raw.astype(np.int16)
    if fmt.signed:
        values = np.where(values >= 2 ** (bits - 1), values - 2**bits, values)
    return values.astype(fmt.dtype)
