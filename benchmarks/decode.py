"""Decode speed of a causal LM with its KV cache: FP32 and quantized artifacts, next to the bandwidth ceiling.

    .venv/bin/python benchmarks/decode.py [--layers 1] [--batches 1,8] [--prompt 128] [--new-tokens 64]
                                          [--backends ort,tvm] [--runs 3] [--workdir DIR] [--write-docs]

Decoding one token reads every weight once, so it is bound by memory bandwidth and its
speed does not depend on the weight values: the model is a random Llama scaled to hidden
4096 (FFN 11008, 32 heads, 8 kv heads, 32k vocabulary; ``--layers`` decoder blocks).
Each pipeline is compiled for each backend (round-to-nearest weights, calibrated on random
ids: speed only, never accuracy; TVM: one library for any shape, and only the pipelines
whose linears run on its kernels, `TVM_PIPELINES`), then every artifact generates greedily
after the same random prompt, runs interleaved in one process against the FP32 ORT one. The ceiling is the machine's
measured read bandwidth (one pass over a 1 GiB array) divided by the weight bytes a
decode step reads (every initializer but the embedding table, of which it reads one row
per token).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from docs_section import machine_stamp, replace_section  # noqa: E402

PIPELINES = {"fp32": "normalize", "w8a8": "w8a8", "w8a8-dyn": "w8a8-dyn", "w4a16": "w4a16", "w4a8": "w4a8",
             "w4a8 kv=int4": "w4a8(kv=int4)"}
# An FP32 TVM library would hold 1.9 GB of constants (weights are compiled into model.so).
TVM_PIPELINES = ("w8a8-dyn", "w4a16", "w4a8", "w4a8 kv=int4")


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of one streaming pass over a large array by every core at once (best of ``repeats``).

    One thread cannot draw the memory bandwidth onnxruntime's thread pool does (a single
    numpy pass measured 14.6 GB/s where the FP32 decode read 32 GB/s), so the array is
    summed in one chunk per core, in threads (numpy releases the GIL while it reduces).
    """
    data = np.ones(int(gib * 2**30) // 8, dtype=np.float64)
    workers = os.cpu_count() or 1
    chunks = np.array_split(data, workers)
    best = 0.0
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for _ in range(repeats):
            tick = time.perf_counter()
            list(pool.map(np.sum, chunks))
            best = max(best, data.nbytes / (time.perf_counter() - tick))
    return best


def bytes_per_step(model) -> int:
    """Weight bytes one decode step reads: every initializer except the embedding table's unread rows."""
    ids = next(v for v in model.graph.inputs if v.name == "input_ids")
    tables = {use.node.inputs[0].name for use in ids.uses() if use.node.op_type == "Gather"}
    return sum(v.const_value.nbytes for name, v in model.graph.initializers.items()
               if v.const_value is not None and name not in tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--backends", default="ort", help="comma-separated: ort, tvm")
    parser.add_argument("--pipelines", default=",".join(PIPELINES),
                        help="comma-separated names of PIPELINES to time (fp32 first: the reference); every "
                             "artifact's weights are resident at once, so at hidden 4096 ten of them exceed 24 GB")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--write-docs", action="store_true", help="replace the decode section of docs/benchmarks.md")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qcompiler-decode-"))

    import onnx_ir as ir
    import torch
    import transformers

    from qcompiler import compiler, decoding
    from qcompiler.backend import make_backend
    from qcompiler.benchmarking import compare_decode
    from qcompiler.capture import load

    folder = workdir / "hf"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                          num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8,
                                          max_position_embeddings=4096, architectures=["LlamaForCausalLM"])
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
    source = workdir / "source.onnx"
    if not source.is_file():
        ir.save(load(folder), source, external_data="source.onnx.data")
    calib = workdir / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(0, 32000, (4, 32)))
    artifacts = {}  # label -> (backend, folder)
    for backend in args.backends.split(","):
        for name, passes in PIPELINES.items():
            if name not in args.pipelines.split(",") or (backend == "tvm" and name not in TVM_PIPELINES):
                continue
            label = name if backend == "ort" else f"{name} (TVM)"
            out = workdir / (name.replace(" ", "-").replace("=", "") + ("" if backend == "ort" else "-tvm"))
            if not (out / "manifest.json").is_file():
                tick = time.perf_counter()
                compiler.compile(str(source), passes, calib=str(calib), output=out, force=True, backend=backend,
                                 verify=False, batch_size=2)
                print(f"compiled {label} in {time.perf_counter() - tick:.0f} s", file=sys.stderr)
            artifacts[label] = (backend, out)

    bandwidth = read_bandwidth()
    models = {name: ir.load(out / "model.onnx") for name, (_, out) in artifacts.items()}
    step_bytes = {name: bytes_per_step(model) for name, model in models.items()}
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        sessions = {}
        for name, (backend, out) in artifacts.items():
            manifest = json.loads((out / "manifest.json").read_text())
            session = make_backend(backend).session(out, manifest, models[name], threads=args.threads, timed=True)
            sessions[name] = (session, decoding.cache_layout(models[name]))
        measured = compare_decode(sessions, batch=batch, prompt_length=args.prompt, new_tokens=args.new_tokens,
                                  vocabulary=32000, runs=args.runs)
        for name, row in measured.items():
            ceiling = bandwidth / step_bytes[name] * batch
            rows.append((batch, name, step_bytes[name], row, ceiling))
        del sessions
    header = ("| batch | artifact | weight MB read per step | prefill ms | decode tokens/s | vs fp32 | "
              "bandwidth ceiling tokens/s | share of ceiling |")
    lines = [header, "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for batch, name, step, row, ceiling in rows:
        lines.append(f"| {batch} | {name} | {step / 1e6:.0f} | {row['prefill_ms']:.0f} | "
                     f"{row['decode_tokens_per_s']:.1f} | {row['decode_ratio']:.2f}x | {ceiling:.1f} | "
                     f"{row['decode_tokens_per_s'] / ceiling:.0%} |")
    command = "benchmarks/decode.py " + " ".join(sys.argv[1:])
    body = "\n".join([
        f"{machine_stamp(command.strip())} Random Llama, hidden 4096, {args.layers} layer(s), 32k vocabulary; "
        f"prompt {args.prompt}, {args.new_tokens} new tokens, backends {args.backends}, {args.runs} runs interleaved, "
        f"read bandwidth {bandwidth / 1e9:.1f} GB/s.", "", *lines])
    print(body)
    if args.write_docs:
        replace_section("decode", "Decoding with the KV cache (benchmarks/decode.py)", body)


if __name__ == "__main__":
    main()
