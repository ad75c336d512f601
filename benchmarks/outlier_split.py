"""The outlier split (w8a8(outliers=T)) on MiniLM: held-out fidelity and ORT latency beside rotate,w8a8.

    .venv/bin/python benchmarks/outlier_split.py [--write] [--runs N]

Same calibration and held-out sentences as benchmarks/fidelity.py; every artifact is the
ORT backend's, fidelity measured on the kernels onnxruntime runs. Latency: batches of 8 x 128
and 1 x 128 tokens, all models in one process with runs interleaved, as ratios to FP32.
"float share" is the outlier channels' part of the quantized linears' multiply-adds.
``--write`` regenerates the table in docs/passes/outlier-split.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx_ir as ir  # noqa: E402

import ort_baselines  # noqa: E402
from minilm_pipelines import arguments, compile_and_measure, publish  # noqa: E402

PAGE = Path(__file__).resolve().parents[1] / "docs" / "passes" / "outlier-split.md"
PIPELINES = ["w8a8", "rotate,w8a8", "w8a8(outliers=6)", "w8a8(outliers=4)", "w8a8(outliers=3)",
             "w8a8-dyn", "w8a8-dyn(outliers=6)"]


def float_share(report) -> str:
    for record in report.passes:
        if "outliers" in record.details:
            return f"{record.details['outliers']['float_share']:.4f}"
    return ""


def onnxruntime_static(fp32_path: Path, data) -> dict[str, ir.Model]:
    """onnxruntime's own static W8A8 on the same calibration part."""
    baseline = fp32_path.with_name("ort_w8a8.onnx")
    return {"onnxruntime quantize_static": ir.load(ort_baselines.w8a8_static(fp32_path, baseline,
                                                                             data.split()[0].batches))}


def main() -> None:
    args = arguments(__doc__.splitlines()[0], PAGE)
    measured = compile_and_measure(PIPELINES, args.runs, baselines=onnxruntime_static)
    lines = [f"{measured.header()} float share |", "|---|" + "---:|" * (3 + len(measured.latency))]
    for name, row in measured.rows():
        share = float_share(measured.results[name].report) if name in measured.results else ""
        lines.append(f"{row} {share} |")
    publish(lines, "outlier_split.py", "outlier-split", PAGE, args)


if __name__ == "__main__":
    main()
