"""Calibration engine speed: statistics of every linear input of MiniLM over 64 sentences.

    .venv/bin/python benchmarks/calibration.py [--sentences 64] [--xtx]

Prints a markdown table (docs/benchmarks.md keeps the latest figures). The target from
the foundation issue is under 10 s on the 2-core CI machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qcompiler.calibration import data as calib_data  # noqa: E402
from qcompiler.calibration.engine import CalibrationEngine  # noqa: E402
from qcompiler.capture import load, load_tokenizer  # noqa: E402
from qcompiler.calibration.resolve import builtin_sentences, model_inputs  # noqa: E402
from qcompiler.compiler import NORMALIZE  # noqa: E402
from qcompiler.inspection import linear_inputs  # noqa: E402
from qcompiler.analysis.linears import find_linears  # noqa: E402
from qcompiler.pass_manager import PassManager  # noqa: E402
from qcompiler.pipeline import parse_pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    model = load("minilm")
    PassManager(parse_pipeline(NORMALIZE), verify=False, progress=False).run(model)
    sentences = builtin_sentences("calibration")[: args.sentences]
    data = calib_data.from_sentences(sentences, load_tokenizer("minilm"), model_inputs(model), args.batch_size)
    tensors = list(linear_inputs(find_linears(model.graph)))

    rows = []
    for label, xtx in (("channel stats + histogram", []), ("... + X^T X for every input", tensors)):
        engine = CalibrationEngine(data, progress=False)
        plan = engine.plan(model, tensors, set(xtx))
        start = time.perf_counter()
        engine.collect(model, tensors, xtx=xtx)
        seconds = time.perf_counter() - start
        cached_start = time.perf_counter()
        engine.collect(model, tensors, xtx=xtx)
        rows.append((label, len(tensors), len(sentences), seconds, time.perf_counter() - cached_start,
                     plan.peak_bytes / 2**20))

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; MiniLM (normalized), batch {args.batch_size}")
    print()
    print("| statistics | tensors | sentences | first run s | cached s | projected peak MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, count, n, seconds, cached, peak in rows:
        print(f"| {label} | {count} | {n} | {seconds:.2f} | {cached:.3f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
