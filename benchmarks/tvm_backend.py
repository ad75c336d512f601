"""The TVM backend against onnxruntime: the int8 kernel alone, then whole MiniLM artifacts.

    .venv/bin/python benchmarks/tvm_backend.py [--runs N] [--write]

1. int8 GEMM, K = N = 4096, M = 1 and 128, float32 X in and Y out on every side:
   - TVM: qcompiler's VNNI kernel, X quantized to int8 per token inside it, uint8 codes x int8
     weights -> int32, row and column scales applied.
   - ORT ``DynamicQuantizeMatMul``: X quantized to uint8 per tensor inside it, then the same
     integer product and scales; onnxruntime's own single-op counterpart.
   - ORT ``MatMulIntegerToFloat`` (the kernel its W8A8 path runs) fed uint8 codes quantized
     beforehand, outside the timed call: its integer GEMM and scales alone, a floor for ORT.
   Every result is checked against numpy's product of the same codes first.
2. MiniLM, batch 1 x 128 tokens: the FP32 model, and for w8a8, w4a16 and w4a8 the ORT artifact and the TVM
   artifact of the same pipeline, timed interleaved in one process (`qcompiler.benchmarking`).

Ratios are to the first row of each table. ``--write`` puts both tables in docs/backends/tvm.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from docs_section import machine_stamp, replace_section  # noqa: E402
from qcompiler.backends.tvm import int8_matmul  # noqa: E402
from qcompiler.backends.tvm.build import TVMSession, compile_model  # noqa: E402
from qcompiler.benchmarking import compare_latency, synthetic_feeds  # noqa: E402
from qcompiler.compiler import compile as qcompile  # noqa: E402
from qcompiler.capture import load  # noqa: E402
from tvm_int4 import medians, relative_error  # noqa: E402

K = N = 4096
PAGE = Path(__file__).resolve().parent.parent / "docs" / "backends" / "tvm.md"


def integer_session(codes: np.ndarray, scale: np.ndarray, dynamic: bool) -> ort.InferenceSession:
    """One node, B int8 constant with per-column scales: ``DynamicQuantizeMatMul`` on float A, or
    ``MatMulIntegerToFloat`` on uint8 A with zero point 128 and scale 1."""
    initializers = [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scale, "b_scale")]
    if dynamic:
        node = helper.make_node("DynamicQuantizeMatMul", ["A", "B", "b_scale"], ["Y"], domain="com.microsoft")
    else:
        initializers += [numpy_helper.from_array(np.float32(1.0).reshape(()), "a_scale"),
                         numpy_helper.from_array(np.uint8(128).reshape(()), "a_zero")]
        node = helper.make_node("MatMulIntegerToFloat", ["A", "B", "a_scale", "b_scale", "a_zero"], ["Y"],
                                domain="com.microsoft")
    a_type = TensorProto.FLOAT if dynamic else TensorProto.UINT8
    graph = helper.make_graph([node], "int8", [helper.make_tensor_value_info("A", a_type, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 2, 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def per_tensor_u8(x: np.ndarray) -> tuple[np.ndarray, np.float32, int]:
    """``DynamicQuantizeLinear``: uint8 codes over [min(x, 0), max(x, 0)], scale and zero point."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = np.float32((high - low) / 255)
    zero = int(np.clip(np.round(-low / step), 0, 255))
    return np.clip(np.round(x / step) + zero, 0, 255).astype(np.uint8), step, zero


def kernel_table(runs: int) -> list[str]:
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (K, N)).astype(np.int8)
    scale = rng.uniform(1e-3, 1e-2, N).astype(np.float32)
    weights = int8_matmul.pack_weights(codes, scale)
    dynamic, integer = integer_session(codes, scale, True), integer_session(codes, scale, False)
    rows = ["| M | TVM int8, float X (ms) | ORT DynamicQuantizeMatMul, float X (ms) | ORT / TVM "
            "| ORT MatMulIntegerToFloat, uint8 X given (ms) | ORT / TVM |", "|---:|---:|---:|---:|---:|---:|"]
    for m in (1, 128):
        x = rng.standard_normal((m, K)).astype(np.float32)
        kernel = int8_matmul.build(m, K, N)
        uploaded = kernel.upload(weights)  # once, as the artifact holds them
        step = np.maximum(np.abs(x).max(axis=1) / 127, 1e-30).astype(np.float32)
        rows_q = np.clip(np.round(x / step[:, None]), -128, 127)
        assert relative_error(kernel(x, uploaded), (rows_q * step[:, None]) @ codes.astype(np.float64) * scale) < 1e-5
        x_u8, x_step, x_zero = per_tensor_u8(x)
        expected = (x_u8.astype(np.int64) - x_zero) @ codes.astype(np.int64) * (x_step * scale.astype(np.float64))
        assert relative_error(dynamic.run(None, {"A": x})[0], expected) < 1e-4  # a rounding tie may differ
        codes_u8 = (rows_q + 128).astype(np.uint8)
        assert relative_error(integer.run(None, {"A": codes_u8})[0],
                              (rows_q.astype(np.int64) @ codes.astype(np.int64)) * scale) < 1e-5
        times = medians({"tvm": lambda: kernel(x, uploaded), "dynamic": lambda: dynamic.run(None, {"A": x}),
                         "integer": lambda: integer.run(None, {"A": codes_u8})},
                        runs or (300 if m == 1 else 40), interleave=True)
        rows.append(f"| {m} | {times['tvm'] * 1e3:.3f} | {times['dynamic'] * 1e3:.3f} "
                    f"| {times['dynamic'] / times['tvm']:.2f} | {times['integer'] * 1e3:.3f} "
                    f"| {times['integer'] / times['tvm']:.2f} |")
    return rows


def model_table(runs: int) -> list[str]:
    """Whole MiniLM at 1 x 128 and 8 x 128: ORT artifacts, TVM libraries built for the shape, and one for any shape."""
    fp32 = load("minilm")
    shapes = ((1, 128), (8, 128))
    built: dict[str, dict] = {}
    for preset in ("w8a8", "w4a16", "w4a8"):
        simulate = qcompile("minilm", preset, backend="simulate", verify=False).model
        built[preset] = {"ort": qcompile("minilm", preset, backend="ort", verify=False).model,
                         "any": compile_model(simulate, None)}
        for rows in shapes:
            feeds = synthetic_feeds(fp32, *rows)
            built[preset][rows] = compile_model(simulate, {name: array.shape for name, array in feeds.items()})
    table = ["| model | 1 x 128 median (ms) | ratio to FP32 | 8 x 128 median (ms) | ratio to FP32 |",
             "|---|---:|---:|---:|---:|"]
    results = []
    for rows in shapes:
        contenders: dict[str, object] = {"FP32 (onnxruntime)": fp32}
        for preset, artifacts in built.items():
            contenders[f"{preset} ORT artifact"] = artifacts["ort"]
            contenders[f"{preset} TVM, built for the shape"] = TVMSession(artifacts[rows].executable,
                                                                          artifacts[rows].signature)
            contenders[f"{preset} TVM, any shape"] = TVMSession(artifacts["any"].executable, artifacts["any"].signature)
        results.append(compare_latency(contenders, synthetic_feeds(fp32, *rows), runs, threads=2))
    for name in results[0]:
        table.append(f"| {name} | " + " | ".join(f"{r[name]['median_ms']:.1f} | {r[name]['ratio']:.2f}"
                                                  for r in results) + " |")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed rounds per model")
    parser.add_argument("--kernel-runs", type=int, default=0,
                        help="timed rounds per int8 GEMM (default: 300 for M=1, 40 for M=128)")
    parser.add_argument("--write", action="store_true", help="rewrite the measured section of docs/backends/tvm.md")
    args = parser.parse_args()
    body = ["int8 GEMM, K = N = 4096:", "", *kernel_table(args.kernel_runs), "", "Whole MiniLM:", "",
            *model_table(args.runs), "", machine_stamp(".venv/bin/python benchmarks/tvm_backend.py --write")]
    print("\n".join(body))
    if args.write:
        replace_section("tvm-backend", "Measured: int8 kernel and whole-model artifacts", "\n".join(body), PAGE)


if __name__ == "__main__":
    main()
