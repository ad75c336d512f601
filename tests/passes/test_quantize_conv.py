"""Convolutions under every preset: a legacy-exported CNN, one Conv against numpy, and a real pre-trained CNN."""

from __future__ import annotations

import collections
import warnings
from importlib.resources import files
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import qcompiler
from qcompiler.calibration.data import from_iterable
from qcompiler.pass_manager import PassManager
from qcompiler.pipeline import parse_pipeline
from qcompiler.quant.annotation import LayerAnnotation, annotated_layers
from qcompiler.quant.presets import PRESETS
from qcompiler.testing import model_from_text, ocr_classifier_path, text_line_images


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> tuple[Path, Path]:
    """A small CNN as the legacy exporter writes it (opset 13): BatchNorm, depthwise, 1x1, residual, Gemm head."""
    import torch

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.norm = torch.nn.BatchNorm2d(16)
            self.depthwise = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.pointwise = torch.nn.Conv2d(16, 32, 1)
            self.body = torch.nn.Conv2d(32, 32, 3, padding=1)
            self.head = torch.nn.Linear(32, 10)

        def forward(self, x):
            x = torch.relu(self.norm(self.stem(x)))
            x = torch.relu(self.pointwise(self.depthwise(x)))
            x = x + torch.relu(self.body(x))
            return self.head(x.mean((2, 3)))

    net = Net().eval()
    net.norm.running_mean.normal_()
    net.norm.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("cnn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, 16, 16),), str(folder / "cnn.onnx"), dynamo=False, opset_version=13,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    images = np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32)
    np.savez(folder / "calibration.npz", x=images)
    return folder / "cnn.onnx", folder / "calibration.npz"


def _conv_annotations(model: ir.Model) -> list[LayerAnnotation]:
    return [a for node, a in annotated_layers(model) if node.op_type == "Conv"]


def test_every_preset_quantizes_the_convolutions(cnn, tmp_path):
    source, calibration = cnn
    for preset in sorted(PRESETS):
        result = qcompiler.compile(str(source), preset, calib=str(calibration), output=str(tmp_path / preset))
        model = ir.load(tmp_path / preset / "model.onnx")
        assert not any(node.op_type == "BatchNormalization" for node in model.graph)  # folded into the stem
        coverage = result.report.passes[-1].details["coverage"]
        # Input channels 3, 16, 16, 32: MX (groups of 32) and NVFP4 (16) activations leave the others float.
        activation = PRESETS[preset][0].activation
        group = activation.group_size if activation is not None and activation.granularity == "group" else 1
        expected = sum(channels % group == 0 for channels in (3, 16, 16, 32))
        assert coverage["Conv"]["quantized"] == expected, preset
        if group > 1:
            assert any("do not divide its 3 input channels" in r for r in coverage["Conv"]["float_reasons"])
        assert coverage["MatMul"]["quantized"] == 1
        fidelity = result.manifest["fidelity"]["outputs"]
        assert min(v["cosine"] for v in fidelity.values()) > (0.999 if "8" in preset else 0.98), preset


def test_static_int8_convolutions_run_as_qlinearconv_on_onnxruntime(cnn, tmp_path):
    source, calibration = cnn
    result = qcompiler.compile(str(source), "w8a8", calib=str(calibration), output=str(tmp_path / "ort"),
                               backend="ort")
    simulated = qcompiler.compile(str(source), "w8a8", calib=str(calibration), output=str(tmp_path / "sim"))
    kernels = result.manifest["layers"]
    assert sum("QLinearConv" in layer.get("kernel", "") for layer in kernels.values()) == 4
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(tmp_path / "ort" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    fused = collections.Counter(node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert fused["QLinearConv"] == 4 and fused["Conv"] == 0
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    reference = ort.InferenceSession(str(tmp_path / "sim" / "model.onnx")).run(None, {"x": x})[0]
    # Integer kernels round the requantized outputs the way the Q/DQ form says, up to float summation order.
    np.testing.assert_allclose(session.run(None, {"x": x})[0], reference, atol=0.05 * np.abs(reference).max())
    assert simulated.manifest["fidelity"]["outputs"]


def test_tvm_runs_quantized_convolutions_with_the_reason_they_are_float(cnn, tmp_path):
    source, calibration = cnn
    for preset in ("w8a8", "w4a4"):
        result = qcompiler.compile(str(source), preset, calib=str(calibration), output=str(tmp_path / preset),
                                   backend="tvm")
        reasons = [layer.get("simulated", "") for layer in result.manifest["layers"].values()]
        assert sum("no TVM integer convolution kernel" in r for r in reasons) == 4
        assert min(v["cosine"] for v in result.manifest["fidelity"]["outputs"].values()) > 0.99


def _one_conv(groups: int = 1) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 16 // groups, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    model = model_from_text(f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N, 16, 6, 6] x) => (float[N, 8, 6, 6] y) <float[8, {16 // groups}, 3, 3] w, float[8] b> {{
            y = Conv <pads = [1, 1, 1, 1], group = {groups}> (x, w, b)
        }}""", {"w": weight, "b": bias})
    return model, weight, bias


def _float_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, groups: int = 1) -> np.ndarray:
    model = model_from_text(f"""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N, 16, 6, 6] x) => (float[N, 8, 6, 6] y) <float[8, {16 // groups}, 3, 3] w, float[8] b> {{
            y = Conv <pads = [1, 1, 1, 1], group = {groups}> (x, w, b)
        }}""", {"w": weight, "b": bias})
    return ort.InferenceSession(ir.to_proto(model).SerializeToString()).run(None, {"x": x})[0]


@pytest.mark.parametrize("groups", [1, 2])
def test_per_pixel_dynamic_activations_and_per_output_channel_weights_match_numpy(groups):
    """w8a8-dyn on a Conv: int8 weights per output channel, int8 scales per pixel over the channels."""
    model, weight, bias = _one_conv(groups)
    rng = np.random.default_rng(1)
    batches = [{"x": rng.standard_normal((2, 16, 6, 6)).astype(np.float32)} for _ in range(4)]
    PassManager(parse_pipeline("w8a8-dyn"), calibration=from_iterable(batches), progress=False).run(model)
    x = batches[0]["x"]
    weight_scale = np.abs(weight).reshape(8, -1).max(1) / 127
    weight_q = np.round(weight / weight_scale[:, None, None, None]) * weight_scale[:, None, None, None]
    pixel_scale = np.abs(x).max(axis=1, keepdims=True) / 127
    x_q = np.clip(np.round(x / pixel_scale), -127, 127) * pixel_scale
    expected = _float_conv(x_q.astype(np.float32), weight_q.astype(np.float32), bias, groups)
    got = ort.InferenceSession(ir.to_proto(model).SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_gptq_takes_the_clipping_search_for_convolutions_and_says_so(cnn, tmp_path):
    source, calibration = cnn
    result = qcompiler.compile(str(source), "w8a8(weights=gptq)", calib=str(calibration), output=str(tmp_path))
    details = result.report.passes[-1].details
    by_op = collections.defaultdict(set)
    for layer in details["layers"]:
        by_op[layer["op"]].add(layer["quantizer"])
    assert by_op == {"Conv": {"mse"}, "MatMul": {"gptq"}}
    assert any("convolutions were quantized with mse" in note for note in details["notes"])


def test_a_conv_read_only_by_quantized_convs_adds_no_output_quantizer():
    """Conv -> Conv: the second one's input Q completes the first one's QLinearConv; a second Q would round twice."""
    rng = np.random.default_rng(0)
    model = model_from_text("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N, 8, 6, 6] x) => (float[N, 8, 6, 6] out) <float[8, 8, 1, 1] w1, float[8, 8, 1, 1] w2> {
            y = Conv (x, w1)
            z = Conv (y, w2)
            out = Relu (z)
        }""", {"w1": rng.standard_normal((8, 8, 1, 1)).astype(np.float32),
               "w2": rng.standard_normal((8, 8, 1, 1)).astype(np.float32)})
    batches = [{"x": rng.standard_normal((2, 8, 6, 6)).astype(np.float32)} for _ in range(4)]
    PassManager(parse_pipeline("w8a8"), calibration=from_iterable(batches), progress=False).run(model)
    first, second = [node for node in model.graph if node.op_type == "Conv"]
    assert [use.node.op_type for use in first.outputs[0].uses()] == ["QuantizeLinear"]  # the second's input
    assert LayerAnnotation.from_node(first).output_range is None
    assert [use.node.op_type for use in second.outputs[0].uses()] == ["QuantizeLinear"]  # its own, before Relu
    assert LayerAnnotation.from_node(second).output_range is not None
    assert model.graph.outputs[0].name == "out"


def test_real_cnn_keeps_its_accuracy_under_w8a8_on_onnxruntime(tmp_path):
    """PaddleOCR's text-direction classifier (real weights) on held-out rendered text lines."""
    data = files("qcompiler").joinpath("data")
    calibration, _ = text_line_images(data.joinpath("calibration.txt").read_text().splitlines()[:48])
    heldout, labels = text_line_images(data.joinpath("heldout.txt").read_text().splitlines()[:64])
    np.savez(tmp_path / "calibration.npz", x=calibration)
    source = ocr_classifier_path()
    result = qcompiler.compile(str(source), "w8a8", calib=str(tmp_path / "calibration.npz"), output=str(tmp_path / "q"),
                               backend="ort")
    assert result.report.passes[-1].details["coverage"]["Conv"] == {"quantized": 53, "float": 0, "float_reasons": {}}
    sizes = result.manifest["weight_bytes"]  # its weights live in Constant nodes, and still count
    assert sizes["source"] > 3 * sizes["artifact"] > 0
    reference = ort.InferenceSession(str(source)).run(None, {"x": heldout})[0]
    quantized = ort.InferenceSession(str(tmp_path / "q" / "model.onnx")).run(None, {"x": heldout})[0]
    assert np.mean(reference.argmax(1) == labels) > 0.9  # the model and the rendering work: a real task
    assert np.mean(quantized.argmax(1) == reference.argmax(1)) >= 62 / 64
    assert np.mean(np.abs(quantized - reference)) < 0.02
