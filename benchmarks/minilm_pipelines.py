"""Compile pipelines on MiniLM for the ORT backend and measure them side by side: the pass benchmarks' common part.

Same calibration and held-out sentences as benchmarks/fidelity.py; every artifact is the
ORT backend's, so fidelity is measured on the kernels onnxruntime runs. Latency: every
model in one process with runs interleaved (`qcompiler.benchmarking.compare_latency`), as
ratios to FP32.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from docs_section import machine_stamp, replace_section
from fidelity import embeddings, score
from qcompiler.benchmarking import compare_latency, synthetic_feeds
from qcompiler.calibration import data as calib_data
from qcompiler.calibration.data import CalibrationData
from qcompiler.calibration.resolve import builtin_sentences, model_inputs
from qcompiler.capture import load_tokenizer
from qcompiler.compiler import CompileResult
from qcompiler.compiler import compile as run_compile
from qcompiler.runtime import make_session

SHAPES = ((8, 128), (1, 128))


@dataclass
class Measured:
    """FP32 and one ORT artifact per pipeline, with compile seconds, held-out (mean, min) cosine and latency."""

    fp32: ir.Model
    results: dict[str, CompileResult] = field(default_factory=dict)
    baselines: dict[str, ir.Model] = field(default_factory=dict)  # other tools' models, e.g. onnxruntime's
    seconds: dict[str, float] = field(default_factory=dict)
    fidelity: dict[str, tuple[float, float]] = field(default_factory=dict)
    latency: dict[tuple[int, int], dict] = field(default_factory=dict)

    @property
    def models(self) -> dict[str, ir.Model]:
        return {"fp32": self.fp32, **{name: result.model for name, result in self.results.items()}, **self.baselines}

    def rows(self) -> list[tuple[str, str]]:
        """``(name, "| label | mean | min | ratio... |")`` per model, for a table to extend with its own columns."""
        out = []
        for name in self.models:
            label = f"`{name}`" if name in self.results else name
            mean, low = self.fidelity[name]
            ratios = "".join(f" {self.latency[shape][name]['ratio']:.2f} |" for shape in self.latency)
            out.append((name, f"| {label} | {mean:.5f} | {low:.4f} |{ratios}"))
        return out

    def header(self) -> str:
        return "| model | mean cosine | min cosine |" + "".join(f" {b}x{s} / fp32 |" for b, s in self.latency)


def compile_and_measure(pipelines: list[str], runs: int, shapes=SHAPES,
                        baselines: Callable[[Path, CalibrationData], dict[str, ir.Model]] | None = None) -> Measured:
    """Compile each pipeline from one normalized FP32 MiniLM on the built-in calibration sentences, then measure all.

    ``baselines(fp32_path, calibration)`` may add other tools' models, measured alongside.
    """
    folder = Path(tempfile.mkdtemp(prefix="qcompiler-bench-"))
    fp32 = run_compile("minilm", "", verify=False).model
    fp32_path = folder / "fp32.onnx"
    ir.save(fp32, fp32_path)
    tokenizer, inputs = load_tokenizer("minilm"), model_inputs(fp32)
    data = calib_data.from_sentences(builtin_sentences("calibration"), tokenizer, inputs)
    heldout = calib_data.from_sentences(builtin_sentences("heldout"), tokenizer, inputs).batches
    measured = Measured(fp32)
    for pipeline in pipelines:
        tick = time.perf_counter()
        measured.results[pipeline] = run_compile(ir.load(fp32_path), pipeline, calib=data, normalize=False,
                                                 backend="ort", verify=False)
        measured.seconds[pipeline] = time.perf_counter() - tick
        print(f"compiled {pipeline} in {measured.seconds[pipeline]:.0f} s", flush=True)
    if baselines is not None:
        measured.baselines = baselines(fp32_path, data)
    reference = embeddings(make_session(fp32), heldout)
    measured.fidelity = {name: score(reference, embeddings(make_session(model, fuse_qdq=True), heldout))
                         for name, model in measured.models.items()}
    measured.latency = {shape: compare_latency(measured.models, synthetic_feeds(fp32, *shape), runs)
                        for shape in shapes}
    return measured


def arguments(description: str, page: Path) -> argparse.Namespace:
    """``--write`` (regenerate the table on ``page``) and ``--runs`` (interleaved latency runs per model)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--write", action="store_true", help=f"rewrite the table in docs/passes/{page.name}")
    parser.add_argument("--runs", type=int, default=20)
    return parser.parse_args()


def publish(lines: list[str], script: str, key: str, page: Path, args: argparse.Namespace) -> None:
    """Print the table; with ``--write``, put it under "Measured on MiniLM" on ``page`` with the machine's stamp."""
    table = "\n".join(lines)
    print(table)
    if args.write:
        stamp = machine_stamp(f".venv/bin/python benchmarks/{script} --write") + (
            f" Mean (min) cosine to FP32 of held-out sentence embeddings; {args.runs} interleaved runs per model.")
        replace_section(key, "Measured on MiniLM", f"{stamp}\n\n{table}", page=page)
