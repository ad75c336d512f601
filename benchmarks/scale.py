"""Scale: a sweep's cells on local Ray against the same cells one after another; compile memory per depth.

    .venv/bin/python benchmarks/scale.py sweep [--json]             # 8 cells, Ray vs serial, byte-for-byte check
    .venv/bin/python benchmarks/scale.py depth [--layers 2,4] [--hidden 4096] [--max-memory 128M,2G] [--json]

``sweep``: 2 models (the real MiniLM and a tiny random Llama) x 4 pipelines on the ORT
backend, compiled once by `qcompiler.sweep` with ``map_trials`` serial (in this process)
and once on a local Ray instance (Ray's start-up counted), into two folders; latency is
not timed, so the walls compare compiles alone. Every cell's model.onnx must be the same
bytes both ways.

``depth``: a random Llama at hidden ``--hidden`` (FFN 2.6875x, 32k vocabulary) with each
number of layers, compiled with ``rotate,w4a16(weights=gptq)`` in a fresh process whose
peak RSS (ru_maxrss) and wall time are reported beside the fp32 weight bytes: the baseline
the layer-streamed compile must flatten. Each ``--max-memory`` bound (the calibration
engine's: exposed activations and GPTQ's X^T X) gets its own rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SWEEP_PIPELINES = ["w8a8", "w8a8-dyn", "smooth,w8a8", "rotate,w8a8"]
DEPTH_PIPELINE = "rotate,w4a16(weights=gptq)"


def run_sweeps(workdir: Path) -> dict:
    import numpy as np

    from qcompiler.distributed import ray_trials, serial_trials
    from qcompiler.sweep import sweep

    sys.path.insert(0, str(ROOT))
    from tests.zoo import build

    llama = build("llama", workdir / "llama")
    rng = np.random.default_rng(0)
    np.savez(workdir / "ids.npz", input_ids=rng.integers(0, 256, (32, 32)).astype(np.int64),
             attention_mask=np.ones((32, 32), np.int64))
    spec = {"models": ["minilm", {"name": "llama", "path": str(llama), "calib": str(workdir / "ids.npz")}],
            "pipelines": SWEEP_PIPELINES, "latency": False}
    walls, digests = {}, {}
    for name in ("serial", "ray"):
        tick = time.perf_counter()
        if name == "serial":
            result = sweep(spec, workdir / name, map_trials=serial_trials, log=lambda _: None)
        else:
            with ray_trials() as on_ray:
                result = sweep(spec, workdir / name, map_trials=on_ray, log=lambda _: None)
        walls[name] = time.perf_counter() - tick
        assert all(row.status == "compiled" for row in result.rows), [row.error for row in result.rows]
        digests[name] = {str(Path(row.cell.folder).relative_to(workdir / name)):
                         hashlib.sha256(Path(row.cell.folder, "model.onnx").read_bytes()).hexdigest()
                         for row in result.rows}
    same = sum(digests["serial"][cell] == digests["ray"].get(cell) for cell in digests["serial"])
    return {"cells": len(digests["serial"]), "cpus": os.cpu_count(), "serial_s": walls["serial"], "ray_s": walls["ray"],
            "ratio": walls["ray"] / walls["serial"], "identical_artifacts": same}


def build_depth(layers: int, hidden: int, workdir: Path) -> None:
    """The random Llama folder and its calibration ids (in a process of its own: torch's copy stays out of the RSS)."""
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                                      num_hidden_layers=layers, num_attention_heads=hidden // 128,
                                      num_key_value_heads=max(1, hidden // 512), tie_word_embeddings=False,
                                      architectures=["LlamaForCausalLM"])
    transformers.LlamaForCausalLM(config).save_pretrained(workdir / f"llama-{layers}", max_shard_size="2GB")
    rng = np.random.default_rng(0)
    np.savez(workdir / "ids.npz", input_ids=rng.integers(0, 32000, (16, 64)).astype(np.int64),
             attention_mask=np.ones((16, 64), np.int64))


def compile_depth(layers: int, workdir: Path, max_memory: str) -> dict:
    """One depth's compile, in this fresh process: its peak RSS and wall time."""
    from qcompiler import compiler

    tick = time.perf_counter()
    result = compiler.compile(str(workdir / f"llama-{layers}"), DEPTH_PIPELINE, calib=str(workdir / "ids.npz"),
                              verify=False, output=workdir / f"out-{layers}-{max_memory}", max_memory=max_memory,
                              log=lambda _: None)
    return {"layers": layers, "max_memory": max_memory,
            "fp32_weight_gib": result.manifest["weight_bytes"]["source"] / 2**30,
            "compile_s": time.perf_counter() - tick,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_depths(layers: list[int], hidden: int, workdir: Path, budgets: list[str]) -> list[dict]:
    rows = []
    for depth in layers:
        build = subprocess.run([sys.executable, __file__, "depth-build", str(depth), str(hidden), str(workdir)],
                               capture_output=True, text=True)
        for budget in budgets:
            run = build if build.returncode != 0 else subprocess.run(
                [sys.executable, __file__, "depth-compile", str(depth), str(hidden), str(workdir), budget],
                capture_output=True, text=True)
            if run.returncode != 0:
                rows.append({"layers": depth, "hidden": hidden, "max_memory": budget,
                             "error": (run.stderr.strip().splitlines() or ["killed"])[-1][:300]})
            else:
                rows.append({"hidden": hidden, **json.loads(run.stdout.strip().splitlines()[-1])})
    return rows


def sweep_table(result: dict) -> list[str]:
    return ["| cells | cores | serial s | local Ray s | Ray / serial | identical model.onnx |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {result['cells']} | {result['cpus']} | {result['serial_s']:.0f} | {result['ray_s']:.0f} | "
            f"{result['ratio']:.2f} | {result['identical_artifacts']} of {result['cells']} |"]


def depth_table(rows: list[dict]) -> list[str]:
    lines = [f"`{DEPTH_PIPELINE}`, today's whole-model compile (not layer-streamed), each in a fresh process:", "",
             "| layers | hidden | --max-memory | fp32 weights GiB | peak RSS GiB | peak / weights | compile s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        head = f"| {row['layers']} | {row['hidden']} | {row['max_memory']} |"
        if "error" in row:
            lines.append(f"{head} | | | | failed: {row['error']} |")
            continue
        lines.append(f"{head} {row['fp32_weight_gib']:.2f} | {row['peak_rss_gib']:.2f} | "
                     f"{row['peak_rss_gib'] / row['fp32_weight_gib']:.1f} | {row['compile_s']:.0f} |")
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "depth-build":
        build_depth(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "depth-compile":
        print(json.dumps(compile_depth(int(sys.argv[2]), Path(sys.argv[4]), sys.argv[5])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["sweep", "depth"])
    parser.add_argument("--layers", default="2,4", help="depth: numbers of layers, comma-separated")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--max-memory", default="2G", help="depth: calibration memory bounds, comma-separated")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", action="store_true", help="also put the table into docs/benchmarks.md")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qcompiler-scale-"))
    if args.what == "sweep":
        result = run_sweeps(workdir)
        lines, heading = sweep_table(result), "Sweeps on local Ray (benchmarks/scale.py sweep)"
    else:
        result = run_depths([int(n) for n in args.layers.split(",")], args.hidden, workdir, args.max_memory.split(","))
        lines, heading = depth_table(result), "Compile memory per depth (benchmarks/scale.py depth)"
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(lines))
    if args.write:
        from docs_section import machine_stamp, replace_section

        command = f"benchmarks/scale.py {' '.join(sys.argv[1:]).replace(' --write', '')}"
        replace_section(f"scale-{args.what}", heading, machine_stamp(command) + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
