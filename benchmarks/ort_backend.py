"""Latency and size of ORT-backend artifacts on MiniLM, beside FP32 and onnxruntime.quantization.

    .venv/bin/python benchmarks/ort_backend.py [--write] [--runs N]

Batches of 8 x 128 and 1 x 128 tokens, onnxruntime on this machine's cores, every model in one process
with runs interleaved; the figure that matters is each median's ratio to FP32's. Linear
weight bytes count the initializers that linear kernels read (codes, scales, zero
points), not the embedding tables. Also the end-to-end compile time of
``smooth,rotate,w4a8``. ``--write`` regenerates the ORT section of docs/benchmarks.md.
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

import onnx_ir as ir  # noqa: E402

import ort_baselines  # noqa: E402
from docs_section import machine_stamp, replace_section  # noqa: E402
from qcompiler.benchmarking import compare_latency, synthetic_feeds  # noqa: E402
from qcompiler.calibration import data as calib_data  # noqa: E402
from qcompiler.capture import load_tokenizer  # noqa: E402
from qcompiler.calibration.resolve import builtin_sentences, model_inputs  # noqa: E402
from qcompiler.compiler import compile as run_compile  # noqa: E402

OURS = {"w8a8": "w8a8", "rotate,w8a8": "rotate,w8a8", "w8a8-dyn": "w8a8-dyn", "w4a16": "w4a16",
        "w4a8": "w4a8", "rotate,w4a8 (gptq)": "rotate,w4a8(weights=gptq,act_order=true,damp=0.1)"}
SHAPES = ((8, 128), (1, 128))  # (batch, tokens): a serving batch and a single request
LINEAR_OPS = {"MatMul", "MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat", "DequantizeLinear", "Gemm"}


def linear_weight_bytes(model: ir.Model) -> int:
    """Bytes of the non-scalar initializers that linear kernels (or weight DequantizeLinear) read."""
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is None or value.const_value.size <= 1:
            continue
        if any(use.node.op_type in LINEAR_OPS and use.idx > 0 or use.node.op_type == "DequantizeLinear"
               for use in value.uses()):
            total += value.const_value.nbytes
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the ORT section of docs/benchmarks.md")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="qcompiler-ort-bench-"))
    fp32 = run_compile("minilm", "", verify=False).model
    fp32_path = folder / "fp32.onnx"
    ir.save(fp32, fp32_path)
    tokenizer = load_tokenizer("minilm")
    data = calib_data.from_sentences(builtin_sentences("calibration"), tokenizer, model_inputs(fp32))
    calibration_part = data.split()[0].batches

    models: dict[str, ir.Model] = {"fp32": fp32}
    compile_seconds: dict[str, float] = {}
    for label, pipeline in OURS.items():
        tick = time.perf_counter()
        models[f"qcompiler {label}"] = run_compile(ir.load(fp32_path), pipeline, calib=data, normalize=False,
                                                   backend="ort", verify=False).model
        compile_seconds[label] = time.perf_counter() - tick
    theirs = {
        "w8a8": lambda out: ort_baselines.w8a8_static(fp32_path, out, calibration_part),
        "w8a8-dyn": lambda out: ort_baselines.w8a8_dynamic(fp32_path, out),
        "w4a16": lambda out: ort_baselines.w4a16(fp32_path, out, "rtn"),
        "w4a8": lambda out: ort_baselines.w4a16(fp32_path, out, "rtn", accuracy_level=4),
    }
    for label, build in theirs.items():
        models[f"onnxruntime {label}"] = ir.load(build(folder / f"ort_{label}.onnx"))

    tick = time.perf_counter()
    run_compile("minilm", "smooth,rotate,w4a8", backend="ort", output=folder / "e2e", verify=True)
    end_to_end = time.perf_counter() - tick

    latency = {shape: compare_latency(models, synthetic_feeds(fp32, *shape), args.runs) for shape in SHAPES}
    fp32_bytes = linear_weight_bytes(fp32)
    header = "".join(f" {b}x{s} ms | {b}x{s} / fp32 |" for b, s in SHAPES)
    lines = [f"| model |{header} linear weight MB | bytes / fp32 |", "|---|" + "---:|" * (2 * len(SHAPES) + 2)]
    for name, model in models.items():
        size = linear_weight_bytes(model)
        cells = "".join(f" {latency[shape][name]['median_ms']:.1f} | {latency[shape][name]['ratio']:.2f} |"
                        for shape in SHAPES)
        lines.append(f"| {name} |{cells} {size / 1e6:.1f} | {size / fp32_bytes:.2f} |")
    lines += ["", f"Compile time, `qcompile minilm --passes smooth,rotate,w4a8 --backend ort` end to end (capture, "
                  f"normalize, calibration, verification, lowering, writing): {end_to_end:.1f} s. Per pipeline above "
                  "(from the normalized model, without verification): "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in compile_seconds.items()) + "."]
    table = "\n".join(lines)
    print(table)
    if args.write:
        stamp = machine_stamp(".venv/bin/python benchmarks/ort_backend.py --write") + (
            f" MiniLM, batches of 8 x 128 and 1 x 128 tokens, {args.runs} interleaved runs per model in one process.")
        replace_section("ort-backend", "ORT backend: latency and size (MiniLM)", f"{stamp}\n\n{table}")


if __name__ == "__main__":
    main()
