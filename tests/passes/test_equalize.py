"""equalize (cross-layer equalization): exact on ReLU/ReLU6/depthwise chains, balanced ranges, refusals, real CNN."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import onnx_ir as ir

import qcompiler
from qcompiler.calibration.data import from_iterable
from qcompiler.pass_manager import PassManager
from qcompiler.pipeline import parse_pipeline
from qcompiler.testing import assert_function_preserved, model_from_text, ocr_classifier_path, text_line_images

CHAIN = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 3, 8, 8] x) => (float[N, 8, 8, 8] y)
      <float[16, 3, 3, 3] w1, float[16] b1, float[16, 1, 3, 3] w2, float[16] b2, float[32, 16, 1, 1] w3,
       float[8, 32, 3, 3] w4, float lo, float hi> {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        ra = Relu (a)
        b = Conv <pads = [1, 1, 1, 1], group = 16> (ra, w2, b2)
        rb = Clip (b, lo, hi)
        c = Conv (rb, w3)
        rc = Relu (c)
        y = Conv <pads = [1, 1, 1, 1]> (rc, w4)
    }"""


def _chain() -> ir.Model:
    """Output channels whose weight ranges span 100x, shuffled: what per-tensor grids lose precision on."""
    rng = np.random.default_rng(0)

    def spread(shape):
        weight = rng.standard_normal(shape).astype(np.float32)
        return weight * rng.permutation(np.logspace(-1, 1, shape[0])).astype(np.float32).reshape(-1, 1, 1, 1)

    return model_from_text(CHAIN, {
        "w1": spread((16, 3, 3, 3)), "b1": rng.standard_normal(16).astype(np.float32),
        "w2": spread((16, 1, 3, 3)), "b2": rng.standard_normal(16).astype(np.float32),
        "w3": spread((32, 16, 1, 1)), "w4": rng.standard_normal((8, 32, 3, 3)).astype(np.float32) * 0.1,
        "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)})


def _batches(count: int = 6, shape: tuple[int, ...] = (2, 3, 8, 8)) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal(shape).astype(np.float32) * 2} for _ in range(count)]


def _run(model: ir.Model, pipeline: str, shape: tuple[int, ...] = (2, 3, 8, 8)):
    calibration = from_iterable(_batches(shape=shape))
    return PassManager(parse_pipeline(pipeline), calibration=calibration, progress=False).run(model)


def test_equalize_is_exact_and_balances_every_pair():
    before, model = _chain(), _chain()
    report = _run(model, "equalize")
    equalized = report.passes[-1].details["equalized"]
    assert [row["pair"].split(" -> ")[1] for row in equalized] == ["Relu", "Clip", "Relu"]
    assert all(row["range_ratio_before"] > 3 and row["range_ratio_after"] < 1.1 for row in equalized)
    assert not any(node.op_type == "Clip" for node in model.graph)  # ReLU6 became Min(Relu(x), per-channel bound)
    assert_function_preserved(before, model, _batches(), rtol=1e-5)


def test_equalize_lowers_the_error_of_int8():
    plain, equalized = _chain(), _chain()
    error = _run(plain, "w8a8").passes[-1].verification["y"]["relative_error"]
    error_equalized = _run(equalized, "equalize,w8a8").passes[-1].verification["y"]["relative_error"]
    assert error_equalized < 0.7 * error


def test_equalize_refuses_pairs_whose_middle_tensor_is_read_elsewhere():
    rng = np.random.default_rng(0)
    model = model_from_text("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N, 8, 6, 6] x) => (float[N, 8, 6, 6] y) <float[8, 8, 1, 1] w1, float[8, 8, 1, 1] w2,
                                                           float lo, float hi> {
            a = Conv (x, w1)
            r = Clip (a, lo, hi)
            c = Conv (r, w2)
            y = Add (c, r)
        }""", {"w1": rng.standard_normal((8, 8, 1, 1)).astype(np.float32),
               "w2": rng.standard_normal((8, 8, 1, 1)).astype(np.float32),
               "lo": np.array(-1.0, np.float32), "hi": np.array(1.0, np.float32)})
    report = _run(model, "equalize", shape=(2, 8, 6, 6))
    refused = report.passes[-1].details["refused"]
    assert list(refused.values()) == ["a Clip other than ReLU6-like Clip(0, max) is not positively homogeneous"]
    assert not report.passes[-1].modified


def test_equalize_on_a_real_cnn_is_verified_exact(tmp_path):
    """PaddleOCR's classifier: HardSwish breaks most chains; the ReLU ones are equalized, the function kept."""
    images, _ = text_line_images(files("qcompiler").joinpath("data/calibration.txt").read_text().splitlines()[:24])
    np.savez(tmp_path / "calibration.npz", x=images)
    result = qcompiler.compile(str(ocr_classifier_path()), "equalize", calib=str(tmp_path / "calibration.npz"))
    record = result.report.passes[-1]
    assert len(record.details["equalized"]) == 5
    assert all(v["relative_error"] < 1e-5 for v in record.verification.values())
