"""The ORT backend: the kernels onnxruntime really runs, and outputs that match the simulate form."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qcompiler.backends.ort.backend import saturation_free_layout
from qcompiler.backends.ort.lower import lower
from qcompiler.calibration import data as calib_data
from qcompiler.pass_manager import PassManager
from qcompiler.pipeline import parse_pipeline
from qcompiler.runtime import make_session, run_batches
from qcompiler.verify import compare_outputs

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def optimized_ops(model: ir.Model, tmp_path) -> collections.Counter:
    """Op counts of the graph onnxruntime actually executes, after its own fusions."""
    source, optimized = tmp_path / "model.onnx", tmp_path / "optimized.onnx"
    ir.save(model, source)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)


@pytest.fixture(scope="module")
def heldout(tokenizer, heldout_sentences):
    return calib_data.from_sentences(heldout_sentences, tokenizer, INPUTS).batches


@pytest.mark.parametrize("preset, kernel, count, tolerance", [
    ("w8a8", "MatMulIntegerToFloat", 37, 1e-5),
    ("w8a8-dyn", "MatMulIntegerToFloat", 37, 5e-3),
    ("w8a8(outliers=6)", "MatMulIntegerToFloat", 37, 1e-5),  # the outlier channels' MatMul stays float beside it
    ("w4a16", "MatMulNBits", 37, 1e-5),
    ("w4a16(eora=4)", "MatMulNBits", 37, 1e-5),  # the low-rank branch stays float beside the kernel
    ("w4a8", "MatMulNBits", 37, 5e-2),
])
def test_minilm_runs_on_integer_kernels_and_matches_simulate(normalized_files, minilm_calibration, heldout, tmp_path,
                                                           preset, kernel, count, tolerance):
    model = ir.load(normalized_files("minilm"))
    reference = run_batches(make_session(model), heldout)
    PassManager(parse_pipeline(preset), calibration=minilm_calibration, verify=False, progress=False).run(model)
    simulated = run_batches(make_session(model), heldout)
    lowering = lower(model, saturation_free_layout())  # what the backend picks for this CPU
    assert len(lowering.kernels) == count and not lowering.simulated
    assert optimized_ops(model, tmp_path)[kernel] == count
    lowered = run_batches(make_session(model), heldout)  # measured: static Q/DQ layers in float
    deployed = run_batches(make_session(model, fuse_qdq=True), heldout)  # every layer on its integer kernel

    def cosine(a, b):
        return min(e["cosine"] for e in compare_outputs(a, b).values())

    # Each layer matches to float rounding (the integer GEMM is exact), but a 1e-6 difference
    # flips a per-token rounding at a tie now and then, and six layers amplify the flips;
    # W4A8's MatMulNBits quantizes activations per block of 128 instead of per token.
    assert cosine(simulated, lowered) > 1 - tolerance
    assert abs(cosine(reference, lowered) - cosine(reference, simulated)) < tolerance
    # As deployed, the static layers' integer kernels meet the float arithmetic's rounding
    # ties too (W8A8 measured 0.99924 on this machine), but never saturate (u8s8 on an AVX2
    # CPU: 0.987).
    assert cosine(simulated, deployed) > 1 - max(tolerance, 5e-3)


def test_formats_without_kernels_stay_simulated(normalized_files, minilm_calibration):
    model = ir.load(normalized_files("minilm"))
    PassManager(parse_pipeline("w8a8(override=*output.dense:nvfp4;*query:w4a4)"), calibration=minilm_calibration,
                verify=False, progress=False).run(model)
    lowering = lower(model)
    assert len(lowering.simulated) == 6 * 3 and len(lowering.kernels) == 37 - 18
    assert all("no CPU kernel" in why for why in lowering.simulated.values())


def test_matmul_nbits_packing_on_odd_shapes():
    """K not a multiple of the group, per-channel int4 as equal-scale blocks, a single row."""
    from qcompiler.quant.annotation import LayerAnnotation, WeightAnnotation
    from qcompiler.quant.spec import QuantSpec
    from qcompiler.testing import linear_model
    from qcompiler.quant.simulate import dequantized_weight
    from qcompiler.quant.spec import quantize

    rng = np.random.default_rng(0)
    for spec in (QuantSpec("uint4", "group", 32, symmetric=False), QuantSpec("int4", "channel"),
                 QuantSpec("int4", "group", 64)):
        weight = rng.standard_normal((100, 24)).astype(np.float32)
        model, matmul = linear_model(weight, 1)
        quantized = quantize(weight, spec, "weight")
        matmul.replace_input_with(1, dequantized_weight(model.graph, quantized, "w", matmul))
        model.graph.initializers.pop("w")
        LayerAnnotation("linear", "test", WeightAnnotation(spec, "rtn", native=True), None, 0.0).to_node(matmul)
        x = rng.standard_normal((2, 1, 100)).astype(np.float32)
        expected = x @ quantized.dequantize()
        assert lower(model).kernels == {"linear": "MatMulNBits"}
        np.testing.assert_allclose(make_session(model).run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)


def test_qdq_dialect_is_standard_onnx_that_onnxruntime_fuses(normalized_files, minilm_calibration, tmp_path):
    from qcompiler.compiler import compile as run_compile

    result = run_compile(ir.load(normalized_files("minilm")), "w4a16", calib=minilm_calibration, normalize=False,
                         backend="ort", dialect="qdq", verify=False)
    model = result.model
    assert all(node.domain in ("", "ai.onnx", "qcompiler") for node in model.graph)
    weights = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(weights) == 37 and all(n.inputs[0].const_value.dtype == ir.DataType.UINT4 for n in weights)
    assert all(info["kernel"].startswith("blocked 4-bit") for info in result.manifest["layers"].values())
    assert optimized_ops(model, tmp_path)["MatMulNBits"] == 37


def saturating_w8a8(dynamic: bool) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    """A W8A8 linear whose int8 products saturate 16-bit pair sums: activation codes at 255, weights at 127.

    With u8 x s8 on x86 without VNNI, each pair 2 x 255 x 127 = 64770 clips at 32767; a
    correct integer GEMM (or the float Q/DQ arithmetic) gives the exact product.
    """
    from qcompiler.quant.annotation import ActivationAnnotation, LayerAnnotation, WeightAnnotation
    from qcompiler.quant.presets import preset_scheme
    from qcompiler.quant.simulate import dequantized_weight, quantized_activation
    from qcompiler.quant.spec import quantize
    from qcompiler.testing import linear_model

    scheme = preset_scheme("w8a8-dyn" if dynamic else "w8a8")
    weight = np.full((64, 8), 1.0, np.float32)
    weight[:, 1::2] = -1.0
    model, matmul = linear_model(weight, 4)
    quantized = quantize(weight, scheme.weight, "weight")
    matmul.replace_input_with(1, dequantized_weight(model.graph, quantized, "w", matmul))
    model.graph.initializers.pop("w")
    x = np.full((2, 4, 64), 3.0, np.float32)
    bounds = None if dynamic else (-3.0, 3.0)
    source = model.graph.inputs[0]
    matmul.replace_input_with(0, quantized_activation(model.graph, source, scheme.activation, bounds, 64))
    LayerAnnotation("linear", "test", WeightAnnotation(scheme.weight, "rtn", native=True),
                    ActivationAnnotation(scheme.activation, bounds, source.name), 0.0).to_node(matmul)
    xq = quantize(x, scheme.activation, "activation",
                  bounds=None if dynamic else (np.float32(-3.0), np.float32(3.0))).dequantize()
    return model, x, xq @ quantized.dequantize()


@pytest.mark.parametrize("dynamic", [False, True])
def test_measuring_sessions_compute_the_qdq_arithmetic_on_any_cpu(dynamic):
    model, x, expected = saturating_w8a8(dynamic)
    np.testing.assert_allclose(make_session(model).run(None, {"x": x})[0], expected, rtol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_u8u8_layout_never_saturates(dynamic):
    model, x, expected = saturating_w8a8(dynamic)
    lowering = lower(model, "u8u8")
    assert lowering.kernels == {"linear": "MatMulIntegerToFloat (per-token)" if dynamic
                                else "MatMulIntegerToFloat (fused from Q/DQ)"}
    integer = [n for n in model.graph if n.op_type in ("MatMulIntegerToFloat", "DequantizeLinear")
               and n.inputs[1 if n.op_type == "MatMulIntegerToFloat" else 0].const_value is not None]
    weights = [n.inputs[1 if n.op_type == "MatMulIntegerToFloat" else 0].const_value for n in integer]
    assert weights and all(w.dtype == ir.DataType.UINT8 for w in weights)
    np.testing.assert_allclose(make_session(model, fuse_qdq=True).run(None, {"x": x})[0], expected, rtol=1e-5)


def test_the_backend_records_its_int8_layout(normalized_files, minilm_calibration):
    from qcompiler.compiler import compile as run_compile

    for layout in ("u8s8", "u8u8"):
        result = run_compile(ir.load(normalized_files("minilm")), "w8a8-dyn", calib=minilm_calibration,
                             normalize=False, backend="ort", int8=layout, verify=False)
        assert result.manifest["ort"] == {"int8": layout}
        codes = {n.inputs[1].const_value.dtype for n in result.model.graph if n.op_type == "MatMulIntegerToFloat"}
        assert codes == {ir.DataType.INT8 if layout == "u8s8" else ir.DataType.UINT8}
    assert saturation_free_layout() in ("u8s8", "u8u8")


SHARED_WEIGHT = """
<ir_version: 10, opset_import: ["" : 23]>
g (float[2, 8, 128] x, float[2, 8, 128] z) => (float[2, 8, 128] y) {
    a = MatMul(x, w)
    b = MatMul(z, w)
    y = Add(a, b)
}
"""


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-dyn", "w4a16", "w4a8", "w4a16(fallback=0.5)",
                                    "w8a8(fallback=0.5)"])
@pytest.mark.parametrize("dialect", ["ort", "qdq"])
def test_a_weight_read_by_two_linears_lowers_to_a_valid_model(preset, dialect):
    """Regression: both quantized copies of a shared weight were named '<w>_dq', an invalid model."""
    from qcompiler.compiler import compile as run_compile
    from qcompiler.testing import model_from_text

    rng = np.random.default_rng(0)
    model = model_from_text(SHARED_WEIGHT, {"w": rng.standard_normal((128, 128)).astype(np.float32)})
    feeds = [{"x": rng.standard_normal((2, 8, 128)).astype(np.float32),
              "z": rng.standard_normal((2, 8, 128)).astype(np.float32)} for _ in range(4)]
    result = run_compile(model, preset, calib=feeds, normalize=False, backend="ort", dialect=dialect)
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    assert len(result.manifest["layers"]) == 2
    assert result.manifest["fidelity"]["outputs"]["y"]["cosine"] > 0.99
    run_batches(make_session(result.model, fuse_qdq=True), feeds)  # runs as deployed
