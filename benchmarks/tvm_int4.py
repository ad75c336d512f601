"""Latency of the TVM fused int4 matmul beside onnxruntime's MatMulNBits, K = N = 4096, g = 128.

    .venv/bin/python benchmarks/tvm_int4.py [--runs N] [--threads T] [--spin] [--write]

One process, runs interleaved (TVM, ORT level 0, ORT level 4, TVM, ...) so every kernel sees
the same machine noise; medians and their ratio to TVM's are what to read. Each call takes a
float32 numpy X and returns a new numpy Y (weights stay resident), as ``InferenceSession.run`` does.

Both runtimes keep their worker threads spinning after a call by default; interleaved, the
idle pool then spins on the cores the other one needs (on 2 cores that made TVM's M=1 call
10x slower). So spinning is off in both (``TVM_THREAD_POOL_SPIN_COUNT=0``, ORT
``session.intra_op.allow_spinning=0``). ``--spin`` leaves it on and times each kernel's runs
back to back instead, each runtime's best case.

The same uint4 asymmetric weights (qcompiler's quantizer, groups of 128 along K) feed all three:

- TVM: `qcompiler.backends.tvm.int4_matmul`, float32 X, W decoded inside the kernel.
- ORT ``com.microsoft.MatMulNBits`` ``accuracy_level=0``: float32 compute, the same math.
- ORT ``accuracy_level=4``: X quantized to int8 per block of 128 along K, integer dot products
  (so W4A8 numerics, checked against numpy with X quantized the same way).
- TVM W4A8 (`qcompiler.backends.tvm.w4a8_matmul`, on CPUs with AVX-512 VNNI): float32 X,
  quantized to int8 per row (qcompiler's W4A8) inside the kernel, integer dot products: level
  4's counterpart, which quantizes X per block inside its kernel. Whole-model artifacts run
  the same kernel, quantization included.

Every result is checked against numpy before timing. ``--write`` puts the table in
docs/backends/tvm.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

THREADS = 2
SPIN = "--spin" in sys.argv
# Read when tvm starts its thread pool (the first parallel call); --threads updates the count.
os.environ["TVM_NUM_THREADS"] = str(THREADS)
if not SPIN:
    os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = "0"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from docs_section import machine_stamp, replace_section  # noqa: E402
from qcompiler.backends.tvm import w4a8_matmul  # noqa: E402
from qcompiler.backends.tvm.int4_matmul import build, pack_weights  # noqa: E402
from qcompiler.backends.tvm.int8_matmul import has_vnni  # noqa: E402
from qcompiler.quant.spec import QuantSpec, quantize  # noqa: E402

K = N = 4096
GROUP = 128
ROWS = (1, 128)
W4A8 = "TVM W4A8 (VNNI, int8 per-row X)"
PAGE = Path(__file__).resolve().parent.parent / "docs" / "backends" / "tvm.md"


def nbits_session(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, accuracy_level: int,
                  threads: int) -> ort.InferenceSession:
    """A one-node ``MatMulNBits`` model: B [N, blocks, 64] (first k in the low nibble), zero points two per byte."""
    k, n = codes.shape
    blocks = -(-k // GROUP)
    padded = np.zeros((blocks * GROUP, n), np.uint8)
    padded[:k] = codes
    per_block = padded.T.reshape(n, blocks, GROUP)
    b = per_block[:, :, 0::2] | (per_block[:, :, 1::2] << 4)
    zeros = np.zeros((n, -(-blocks // 2) * 2), np.uint8)
    zeros[:, :blocks] = zero.T
    zero_bytes = (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).reshape(-1)
    initializers = [numpy_helper.from_array(b, "B"),
                    numpy_helper.from_array(np.ascontiguousarray(scale.T, np.float32).reshape(-1), "scales"),
                    numpy_helper.from_array(zero_bytes, "zero_points")]
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=GROUP, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "matmul_nbits",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], initializers)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if SPIN else "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def int8_blocks(x: np.ndarray) -> np.ndarray:
    """X as accuracy level 4 sees it: symmetric int8 per block of GROUP along K, dequantized."""
    m, k = x.shape
    blocks = x.reshape(m, k // GROUP, GROUP)
    step = (np.abs(blocks).max(axis=-1, keepdims=True) / 127).astype(np.float32)
    codes = np.clip(np.round(blocks / np.where(step > 0, step, 1)), -127, 127)
    return (codes * step).reshape(m, k)


def int8_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """X as qcompiler's W4A8 sees it (the reference): symmetric int8 per row, uint8 codes ``q + 128``, row scales."""
    step = np.maximum(np.abs(x).max(axis=1) / 127, 1e-30).astype(np.float32)
    codes = np.clip(np.round(x / step[:, None]), -128, 127)
    return (codes + 128).astype(np.uint8), step


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def medians(contenders: dict[str, Callable[[], object]], runs: int, interleave: bool) -> dict[str, float]:
    """Median seconds of each callable after warm-up calls, timed round-robin or each in its own block."""
    times: dict[str, list[float]] = {name: [] for name in contenders}

    def timed(name: str) -> None:
        tick = time.perf_counter()
        contenders[name]()
        times[name].append(time.perf_counter() - tick)

    for call in contenders.values():
        call()
    if interleave:
        for _ in range(runs):
            for name in contenders:
                timed(name)
    else:
        for name, call in contenders.items():
            for _ in range(3):
                call()
            for _ in range(runs):
                timed(name)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=0, help="timed rounds per M (default: 300 for M=1, 40 for M=128)")
    parser.add_argument("--threads", type=int, default=THREADS, help="TVM and ORT threads")
    parser.add_argument("--spin", action="store_true", help="thread pools spin between calls; runs back to back")
    parser.add_argument("--write", action="store_true", help="rewrite the int4 section of docs/backends/tvm.md")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    rng = np.random.default_rng(0)
    q = quantize(rng.standard_normal((K, N)).astype(np.float32), QuantSpec("uint4", "group", GROUP, symmetric=False),
                 "weight")
    codes, scale, zero = q.values.astype(np.uint8), q.scale, q.zero_point.astype(np.uint8)
    w = q.dequantize().astype(np.float64)
    packed = pack_weights(codes, scale, zero, GROUP)
    w4a8_weights = w4a8_matmul.pack_weights(codes, scale, zero, GROUP) if has_vnni() else None
    sessions = {level: nbits_session(codes, scale, zero, level, args.threads) for level in (0, 4)}

    lines = ["| M | kernel | median ms | time / TVM | error vs its numpy reference | error vs float X @ W |",
             "|---:|---|---:|---:|---:|---:|"]
    for m in ROWS:
        x = rng.standard_normal((m, K)).astype(np.float32)
        matmul = build(m, K, N, GROUP)
        weights = matmul.upload(packed)
        feeds = {"A": x}
        expected = x.astype(np.float64) @ w
        outputs = {f"TVM ({matmul.schedule} schedule)": matmul(x, weights),
                   "ORT MatMulNBits level 0": sessions[0].run(None, feeds)[0],
                   "ORT MatMulNBits level 4": sessions[4].run(None, feeds)[0]}
        references = dict(zip(outputs, [expected, expected, int8_blocks(x) @ w]))
        calls = dict(zip(outputs, [lambda: matmul(x, weights), lambda: sessions[0].run(None, feeds),
                                  lambda: sessions[4].run(None, feeds)]))
        if has_vnni():
            integer = w4a8_matmul.build(m, K, N, GROUP)
            resident = integer.upload(w4a8_weights)

            codes_u8, step = int8_rows(x)
            outputs[W4A8] = integer(x, resident)
            references[W4A8] = ((codes_u8.astype(np.float64) - 128) * step[:, None]) @ w
            calls[W4A8] = lambda integer=integer, x=x, resident=resident: integer(x, resident)
        errors = {name: relative_error(y, references[name]) for name, y in outputs.items()}
        for name, error in errors.items():
            if error > 1e-4:
                raise SystemExit(f"M={m}: {name} is off the numpy reference by {error:.1e} of the output's scale")
        timings = medians(calls, args.runs or (300 if m == 1 else 40), interleave=not args.spin)
        baseline = next(iter(timings.values()))
        for name, seconds in timings.items():
            lines.append(f"| {m} | {name} | {seconds * 1e3:.3f} | {seconds / baseline:.2f} | {errors[name]:.1e} "
                         f"| {relative_error(outputs[name], expected):.1e} |")

    header = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; TVM_NUM_THREADS={args.threads}, "
              f"ORT intra_op_num_threads={args.threads}; onnxruntime {ort.__version__}; K=N={K}, group {GROUP}, "
              "uint4 asymmetric weights; errors are max |difference| / max |reference|, level 4's reference "
              "quantizes X to int8 per block as it does. "
              + ("Pools spinning, runs back to back." if args.spin else "Pools not spinning, runs interleaved."))
    body = "\n".join([header, "", *lines, "", machine_stamp(".venv/bin/python benchmarks/tvm_int4.py --write")])
    print(body)
    if args.write:
        replace_section("tvm-int4", "Measured: int4 kernels", body, PAGE)


if __name__ == "__main__":
    main()
