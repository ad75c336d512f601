"""Fidelity of every preset under every transform pipeline on MiniLM, beside onnxruntime's own.

    .venv/bin/python benchmarks/fidelity.py [--write] [--quick]
    .venv/bin/python benchmarks/fidelity.py --pipeline "rotate,w4a16(weights=gptq)"

Calibration: qcompiler's built-in calibration sentences (the pass manager keeps a quarter
for verification; the rest calibrates, and onnxruntime gets exactly that part). Evaluation:
the built-in held-out sentences, which share no sentence with calibration. The figure is
the cosine between each sentence's embedding (masked mean pooling, L2-normalized) under
the quantized model and under FP32, averaged over the sentences (min in parentheses).
``--write`` regenerates the fidelity section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402

import ort_baselines  # noqa: E402
from docs_section import machine_stamp, replace_section  # noqa: E402
from qcompiler.calibration import data as calib_data  # noqa: E402
from qcompiler.capture import load, load_tokenizer  # noqa: E402
from qcompiler.calibration.resolve import builtin_sentences, model_inputs  # noqa: E402
from qcompiler.compiler import NORMALIZE  # noqa: E402
from qcompiler.evaluation import sentence_embeddings  # noqa: E402
from qcompiler.pass_manager import PassManager  # noqa: E402
from qcompiler.pipeline import parse_pipeline  # noqa: E402
from qcompiler.runtime import make_session, run_batches  # noqa: E402

PRESETS = ["w8a8", "w8a8-dyn", "w4a16", "w4a8", "w4a4", "fp8", "mxfp8", "mxfp4", "nvfp4"]
PIPELINES = ["", "smooth(search=true)", "shift(scale=true)", "rotate", "smooth(search=true),rotate", "reassemble"]
WEIGHT_QUANTIZERS = {"w4a16": ["gptq", "awq", "awq-gptq"], "w4a8": ["gptq", "awq"], "w4a4": ["gptq"]}
GPTQ = "weights=gptq,act_order=true,damp=0.1,scales=mse,refine=3"
EORA = "eora=16,lowrank_dtype=int8"  # the rotate + gptq + eora column (w4a16): docs/passes/lowrank.md
OUTLIERS = "outliers=6"  # the outlier split column (presets with int8 activations): docs/passes/outlier-split.md
OUTLIER_PRESETS = ["w8a8", "w8a8-dyn", "w4a8"]


def embeddings(session, batches) -> np.ndarray:
    outputs = run_batches(session, batches)
    first = session.get_outputs()[0].name
    return np.concatenate([sentence_embeddings(o[first], b["attention_mask"]) for o, b in zip(outputs, batches)])


def score(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    cosines = np.sum(reference * candidate, axis=1)
    return float(cosines.mean()), float(cosines.min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the fidelity section of docs/benchmarks.md")
    parser.add_argument("--quick", action="store_true", help="two presets, two pipelines, no ORT GPTQ (a smoke run)")
    parser.add_argument("--pipeline", action="append", default=[],
                        help="score only this full pipeline (transforms and quantize pass); repeatable")
    args = parser.parse_args()
    if args.pipeline and args.write:
        parser.error("--pipeline scores single pipelines; --write needs the full table")
    presets = PRESETS[:3] if args.quick else PRESETS
    pipelines = PIPELINES[::3] if args.quick else PIPELINES

    base = load("minilm")
    PassManager(parse_pipeline(NORMALIZE), verify=False, progress=False).run(base)
    tokenizer, inputs = load_tokenizer("minilm"), model_inputs(base)
    data = calib_data.from_sentences(builtin_sentences("calibration"), tokenizer, inputs)
    calibration_part = data.split()[0]
    heldout = calib_data.from_sentences(builtin_sentences("heldout"), tokenizer, inputs).batches
    reference = embeddings(make_session(base), heldout)
    folder = Path(tempfile.mkdtemp(prefix="qcompiler-fidelity-"))
    fp32_path = folder / "fp32.onnx"
    ir.save(base, fp32_path)

    ours: dict[tuple[str, str], tuple[float, float, float]] = {}

    def run(preset_call: str, pipeline: str, key: tuple[str, str]) -> None:
        model = ir.load(fp32_path)
        full = ",".join(p for p in (pipeline, preset_call) if p)
        tick = time.perf_counter()
        PassManager(parse_pipeline(full), calibration=data, verify=False, progress=False).run(model)
        seconds = time.perf_counter() - tick
        ours[key] = (*score(reference, embeddings(make_session(model), heldout)), seconds)
        print(f"{full:55s} {ours[key][0]:.5f} ({ours[key][1]:.5f})  {seconds:.1f}s", flush=True)

    if args.pipeline:
        for full in args.pipeline:
            run(full, "", ("", full))
        return

    for preset in presets:
        for pipeline in pipelines:
            run(preset, pipeline, (preset, pipeline or "none"))
        for quantizer in WEIGHT_QUANTIZERS.get(preset, []):
            options = {"gptq": GPTQ, "awq": "weights=awq", "awq-gptq": GPTQ.replace("gptq", "awq-gptq")}[quantizer]
            run(f"{preset}({options})", "", (preset, quantizer))
            if quantizer == "gptq":
                run(f"{preset}({options})", "rotate", (preset, "rotate + gptq"))
                if preset == "w4a16":
                    run(f"{preset}({options},{EORA})", "rotate", (preset, "rotate + gptq + eora"))
                if preset == "w4a4":
                    run(f"{preset}({options})", "affine", (preset, "affine + gptq"))
        if preset in OUTLIER_PRESETS:
            run(f"{preset}({OUTLIERS})", "", (preset, OUTLIERS))

    theirs = onnxruntime_rows(fp32_path, folder, calibration_part.batches, heldout, reference, quick=args.quick)
    table = render(ours, theirs, presets, pipelines)
    print(table)
    if args.write:
        write_docs(table)


def onnxruntime_rows(fp32_path: Path, folder: Path, calib, heldout, reference, quick: bool) -> dict[str, tuple]:
    """onnxruntime.quantization on the same model, calibration part and held-out sentences."""
    configs = {
        "w8a8": ("quantize_static QDQ, int8 per-channel weights, int8 asym per-tensor activations (MinMax)",
                 lambda out: ort_baselines.w8a8_static(fp32_path, out, calib)),
        "w8a8-dyn": ("quantize_dynamic, int8 per-channel weights, uint8 per-tensor dynamic activations",
                     lambda out: ort_baselines.w8a8_dynamic(fp32_path, out)),
        "w4a16": ("MatMulNBits RTN, 4-bit asym g128", lambda out: ort_baselines.w4a16(fp32_path, out, "rtn")),
        "w4a8": ("MatMulNBits RTN, 4-bit asym g128, accuracy_level=4 (int8 activations per block)",
                 lambda out: ort_baselines.w4a16(fp32_path, out, "rtn", accuracy_level=4)),
        "w4a16 hqq": ("MatMulNBits HQQ, 4-bit asym g128", lambda out: ort_baselines.w4a16(fp32_path, out, "hqq")),
        "w4a16 gptq": ("MatMulNBits, ORT's GPTQ, 4-bit sym g128 (its asym cannot pack K=384)",
                       lambda out: ort_baselines.w4a16(fp32_path, out, "gptq", symmetric=True, calib_feeds=calib)),
    }
    if quick:
        configs.pop("w4a16 gptq")
    rows = {}
    for key, (label, build) in configs.items():
        tick = time.perf_counter()
        path = build(folder / f"ort_{key.replace(' ', '_')}.onnx")
        seconds = time.perf_counter() - tick
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # MatMulNBits takes its compute precision from its own accuracy_level attribute.
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        rows[key] = (label, *score(reference, embeddings(session, heldout)), seconds)
        print(f"onnxruntime {key:20s} {rows[key][1]:.5f} ({rows[key][2]:.5f})  {seconds:.1f}s", flush=True)
    return rows


def render(ours, theirs, presets, pipelines) -> str:
    columns = [p or "none" for p in pipelines] + ["gptq", "rotate + gptq", "rotate + gptq + eora", "affine + gptq", OUTLIERS, "awq",
                                                  "awq-gptq"]
    header = "| preset | " + " | ".join(columns) + " | best | onnxruntime |"
    lines = [header, "|" + "---|" * (len(columns) + 3)]
    for preset in presets:
        cells = []
        for column in columns:
            value = ours.get((preset, column))
            cells.append(f"{value[0]:.4f}" if value else "")
        best_key = max((k for k in ours if k[0] == preset), key=lambda k: ours[k][0])
        ort_value = theirs.get(preset)
        ort_cell = f"{ort_value[1]:.4f}" if ort_value else "no equivalent"
        lines.append(f"| {preset} | " + " | ".join(cells) + f" | **{ours[best_key][0]:.4f}** ({best_key[1]}) | {ort_cell} |")
    lines.append("")
    lines.append("onnxruntime.quantization configurations (same calibration part, same held-out sentences):")
    lines.append("")
    lines.append("| config | onnxruntime | mean cosine | min cosine | quantize s |")
    lines.append("|---|---|---:|---:|---:|")
    for key, (label, mean, low, seconds) in theirs.items():
        lines.append(f"| {key} | {label} | {mean:.4f} | {low:.4f} | {seconds:.1f} |")
    lines.append("")
    lines.append("Minimum cosine and compile time of each of our cells:")
    lines.append("")
    lines.append("| preset | pipeline | mean cosine | min cosine | compile s |")
    lines.append("|---|---|---:|---:|---:|")
    for (preset, pipeline), (mean, low, seconds) in ours.items():
        lines.append(f"| {preset} | {pipeline} | {mean:.4f} | {low:.4f} | {seconds:.1f} |")
    return "\n".join(lines)


def write_docs(table: str) -> None:
    stamp = machine_stamp(".venv/bin/python benchmarks/fidelity.py --write") + (
        " Mean cosine to FP32 of held-out sentence embeddings; rows are presets, columns transform pipelines before "
        f"the preset, `gptq` is `{GPTQ}`, `awq` is `weights=awq`, `awq-gptq` AWQ's scales then GPTQ with the same "
        f"options, `rotate + gptq + eora` adds `{EORA}` (low-rank compensation, docs/passes/lowrank.md), "
        "`affine + gptq` learns FlatQuant's transforms first (docs/passes/affine.md), "
        f"`{OUTLIERS}` is LLM.int8()'s outlier split (docs/passes/outlier-split.md).")
    replace_section("fidelity", "Quantization fidelity (MiniLM)", f"{stamp}\n\n{table}")


if __name__ == "__main__":
    main()
