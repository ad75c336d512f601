"""Properties of the formats and the quantize arithmetic (hypothesis)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcompiler.quant.formats import ELEMENT_FORMATS, element_format, pack, unpack
from qcompiler.quant.spec import QuantSpec, broadcast, quantize

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
weights = hnp.arrays(np.float32, st.tuples(st.integers(1, 70), st.integers(1, 9)), elements=finite)
INT_SPECS = [QuantSpec(f, g, 16, symmetric=s) for f in ("int8", "uint8", "int4", "uint4", "int2", "uint2")
             for g in ("tensor", "channel", "group", "ic-group") for s in (True, False)
             if not (f.startswith("u") and s)]
FLOAT_SPECS = [QuantSpec(f, g, 16) for f in ("fp8-e4m3", "fp8-e5m2", "fp4-e2m1") for g in ("tensor", "channel", "group")]
BLOCK_SPECS = [QuantSpec("mxfp8"), QuantSpec("mxfp4"), QuantSpec("nvfp4")]


@settings(max_examples=25, deadline=None)
@given(weights, st.sampled_from(INT_SPECS))
def test_integer_round_trip_is_within_half_a_step(w, spec):
    q = quantize(w, spec, "weight")
    step = broadcast(q.scale, w.shape, q.axis, q.block)
    assert np.all(np.isfinite(q.scale)) and np.all(q.scale > 0)
    assert np.all(np.abs(q.dequantize() - w) <= step * 0.5 + 1e-6 * np.abs(w).max() + 1e-30)
    fmt = spec.element
    assert q.values.min() >= fmt.qmin and q.values.max() <= fmt.qmax
    assert np.array_equal(q.values, np.round(q.values))


@settings(max_examples=25, deadline=None)
@given(weights, st.sampled_from(FLOAT_SPECS + BLOCK_SPECS))
@example(np.array([[1.1754944e-38]], np.float32), QuantSpec("fp8-e5m2", "tensor", 16))  # a subnormal scale once
def test_float_round_trip_is_within_half_a_grid_step(w, spec):
    q = quantize(w, spec, "weight")
    scale = broadcast(q.scale, w.shape, q.axis, q.block)
    assert np.all(np.isfinite(q.scale)) and np.all(q.scale > 0)
    fmt = spec.element
    scaled = w / scale
    # The spacing of the minifloat grid around each value, from ml_dtypes itself.
    info = ml_dtypes.finfo(fmt.dtype)
    exponent = np.floor(np.log2(np.maximum(np.abs(np.clip(scaled, -fmt.max_value, fmt.max_value)), float(info.smallest_normal))))
    spacing = 2.0 ** (exponent - info.nmant)
    clipped = np.abs(scaled) > fmt.max_value
    error = np.abs(q.values - np.clip(scaled, -fmt.max_value, fmt.max_value))
    assert np.all(error <= spacing * 0.5 * (1 + 1e-5))
    # Block formats may saturate: MX rounds the shared exponent down, NVFP4 rounds its E4M3
    # block scale to nearest (a block maximum can land up to 1/16 above the element range).
    if spec.format not in ("mxfp8", "mxfp4", "nvfp4"):
        assert not np.any(clipped & (np.abs(scaled) > fmt.max_value * (1 + 1e-3)))


@given(st.sampled_from([f for f in ELEMENT_FORMATS.values() if f.bits < 8]), st.integers(1, 200), st.integers(0, 2**31))
def test_sub_byte_packing_round_trips(fmt, count, seed):
    rng = np.random.default_rng(seed)
    if fmt.kind == "int":
        codes = rng.integers(int(fmt.qmin), int(fmt.qmax) + 1, count).astype(fmt.dtype)
    else:
        codes = rng.choice(np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -6], np.float32), count).astype(fmt.dtype)
    packed = pack(codes, fmt.bits)
    assert packed.dtype == np.uint8 and packed.size == -(-count * fmt.bits // 8)
    restored = unpack(packed, fmt, count)
    assert np.array_equal(restored.astype(np.float32), codes.astype(np.float32))


def test_int4_packing_matches_onnx_nibble_order():
    codes = np.array([1, -2, 7], dtype=ml_dtypes.int4)
    assert list(pack(codes, 4)) == [0xE1, 0x07]


def test_all_zero_blocks_get_unit_scales():
    for spec in INT_SPECS[:4] + FLOAT_SPECS + BLOCK_SPECS:
        q = quantize(np.zeros((64, 8), np.float32), spec, "weight")
        assert np.all(q.scale > 0) and np.all(np.isfinite(q.scale))
        assert np.all(q.dequantize() == 0)


def test_nan_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([[1.0, np.nan]], np.float32), QuantSpec("int8"), "weight")


def test_spec_validation():
    with pytest.raises(ValueError, match="symmetric only"):
        QuantSpec("fp8", symmetric=False)
    with pytest.raises(ValueError, match="dynamic"):
        QuantSpec("int8", "token")
    with pytest.raises(ValueError, match="unknown element format"):
        QuantSpec("int3")
    assert QuantSpec("nvfp4").group_size == 16 and QuantSpec("mxfp4").granularity == "group"
    assert element_format("fp4-e2m1").max_value == 6.0 and element_format("fp8-e4m3").max_value == 448.0


def test_nvfp4_scales_are_e4m3_times_a_tensor_scale():
    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    q = quantize(w, QuantSpec("nvfp4"), "weight")
    # Each block's scale is an E4M3 value times the one float32 tensor scale.
    blocks = (q.scale / q.tensor_scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_allclose(blocks * q.tensor_scale, q.scale, rtol=1e-6)


def test_mx_scales_are_powers_of_two():
    w = np.random.default_rng(0).standard_normal((96, 8)).astype(np.float32) * 3
    q = quantize(w, QuantSpec("mxfp4"), "weight")
    exponents = np.log2(q.scale)
    assert np.array_equal(exponents, np.round(exponents)) and q.scale.shape == (3, 8)
