"""The outlier split (w8a8(outliers=T)) on MiniLM: held-out fidelity and ORT latency beside rotate,w8a8.

    .venv/bin/python benchmarks/outlier_split.py [--write] [--runs N]

Same calibration and held-out sentences as benchmarks/fidelity.py; every artifact is the
ORT backend's, fidelity measured on the kernels onnxruntime runs. Latency: batches of 8 x 128
and 1 x 128 tokens, all models in one process with runs interleaved, as ratios to FP32.
"float share" is the outlier channels' part of the quantized linears' multiply-adds.
``--write`` regenerates the table in docs/passes/outlier-split.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx_ir as ir  # noqa: E402

import ort_baselines  # noqa: E402
from docs_section import machine_stamp, replace_section  # noqa: E402
from fidelity import embeddings, score  # noqa: E402
from qcompiler.benchmarking import compare_latency, synthetic_feeds  # noqa: E402
from qcompiler.calibration import data as calib_data  # noqa: E402
from qcompiler.calibration.resolve import builtin_sentences, model_inputs  # noqa: E402
from qcompiler.capture import load_tokenizer  # noqa: E402
from qcompiler.compiler import compile as run_compile  # noqa: E402
from qcompiler.runtime import make_session  # noqa: E402

PAGE = Path(__file__).resolve().parents[1] / "docs" / "passes" / "outlier-split.md"
PIPELINES = ["w8a8", "rotate,w8a8", "w8a8(outliers=6)", "w8a8(outliers=4)", "w8a8(outliers=3)",
             "w8a8-dyn", "w8a8-dyn(outliers=6)"]
SHAPES = ((8, 128), (1, 128))


def float_share(report) -> str:
    for record in report.passes:
        if "outliers" in record.details:
            return f"{record.details['outliers']['float_share']:.4f}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the table in docs/passes/outlier-split.md")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="qcompiler-outliers-"))
    fp32 = run_compile("minilm", "", verify=False).model
    fp32_path = folder / "fp32.onnx"
    ir.save(fp32, fp32_path)
    tokenizer, inputs = load_tokenizer("minilm"), model_inputs(fp32)
    data = calib_data.from_sentences(builtin_sentences("calibration"), tokenizer, inputs)
    heldout = calib_data.from_sentences(builtin_sentences("heldout"), tokenizer, inputs).batches
    reference = embeddings(make_session(fp32), heldout)

    models, shares = {"fp32": fp32}, {}
    for pipeline in PIPELINES:
        result = run_compile(ir.load(fp32_path), pipeline, calib=data, normalize=False, backend="ort", verify=False)
        models[pipeline], shares[pipeline] = result.model, float_share(result.report)
    baseline = folder / "ort_w8a8.onnx"
    models["onnxruntime quantize_static"] = ir.load(
        ort_baselines.w8a8_static(fp32_path, baseline, data.split()[0].batches))

    fidelity = {name: score(reference, embeddings(make_session(model, fuse_qdq=True), heldout))
                for name, model in models.items()}
    latency = {shape: compare_latency(models, synthetic_feeds(fp32, *shape), args.runs) for shape in SHAPES}
    header = "".join(f" {b}x{s} / fp32 |" for b, s in SHAPES)
    lines = [f"| model | mean cosine | min cosine | float share |{header}", "|---|" + "---:|" * (3 + len(SHAPES))]
    for name in models:
        label = name if name.startswith(("fp32", "onnxruntime")) else f"`{name}`"
        cells = "".join(f" {latency[shape][name]['ratio']:.2f} |" for shape in SHAPES)
        mean, low = fidelity[name]
        lines.append(f"| {label} | {mean:.5f} | {low:.4f} | {shares.get(name, '')} |{cells}")
    table = "\n".join(lines)
    print(table)
    if args.write:
        stamp = machine_stamp(".venv/bin/python benchmarks/outlier_split.py --write") + (
            f" Mean (min) cosine to FP32 of held-out sentence embeddings; {args.runs} interleaved runs per model.")
        replace_section("outlier-split", "Measured on MiniLM", f"{stamp}\n\n{table}", page=PAGE)


if __name__ == "__main__":
    main()
