"""Low-rank compensation (lorc / eora) on MiniLM: held-out fidelity against the bytes the branch costs.

    .venv/bin/python benchmarks/lowrank.py [--write]

Same calibration and held-out sentences as benchmarks/fidelity.py. "branch / 4-bit" is the
bytes of the low-rank factors over the bytes of the 4-bit codes of the linears they
compensate (K N / 2 each; group scales not counted), the size the compensation adds to
the quantized linears. ``--write`` regenerates the table in docs/passes/lowrank.md.
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

from docs_section import machine_stamp, replace_section  # noqa: E402
from fidelity import GPTQ, embeddings, score  # noqa: E402
from qcompiler.analysis.linears import find_linears  # noqa: E402
from qcompiler.calibration import data as calib_data  # noqa: E402
from qcompiler.calibration.resolve import builtin_sentences, model_inputs  # noqa: E402
from qcompiler.capture import load, load_tokenizer  # noqa: E402
from qcompiler.compiler import NORMALIZE  # noqa: E402
from qcompiler.pass_manager import PassManager  # noqa: E402
from qcompiler.pipeline import parse_pipeline  # noqa: E402
from qcompiler.runtime import make_session  # noqa: E402

PAGE = Path(__file__).resolve().parents[1] / "docs" / "passes" / "lowrank.md"
PIPELINES = [
    "w4a16",
    "w4a16(lorc=8)",
    "w4a16(eora=8)",
    "w4a16(eora=8,lowrank_dtype=int8)",
    "w4a16(eora=16,lowrank_dtype=int8)",
    "rotate,w4a16(eora=8)",
    f"w4a16({GPTQ})",
    f"w4a16({GPTQ},eora=16,lowrank_dtype=int8)",
    f"rotate,w4a16({GPTQ})",
    f"rotate,w4a16({GPTQ},lorc=16,lowrank_dtype=int8)",
    f"rotate,w4a16({GPTQ},eora=8,lowrank_dtype=int8)",
    f"rotate,w4a16({GPTQ},eora=16,lowrank_dtype=int8)",
    f"rotate,w4a16({GPTQ},eora=32,lowrank_dtype=int8)",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the table in docs/passes/lowrank.md")
    args = parser.parse_args()
    base = load("minilm")
    PassManager(parse_pipeline(NORMALIZE), verify=False, progress=False).run(base)
    tokenizer, inputs = load_tokenizer("minilm"), model_inputs(base)
    data = calib_data.from_sentences(builtin_sentences("calibration"), tokenizer, inputs)
    heldout = calib_data.from_sentences(builtin_sentences("heldout"), tokenizer, inputs).batches
    reference = embeddings(make_session(base), heldout)
    params = {linear.layer: linear.in_features * linear.out_features for linear in find_linears(base.graph)}
    path = Path(tempfile.mkdtemp(prefix="qcompiler-lowrank-")) / "fp32.onnx"
    ir.save(base, path)

    lines = ["| pipeline | mean cosine | min cosine | branch / 4-bit | compile s |", "|---|---:|---:|---:|---:|"]
    for pipeline in PIPELINES:
        model = ir.load(path)
        tick = time.perf_counter()
        report = PassManager(parse_pipeline(pipeline), calibration=data, verify=False, progress=False).run(model)
        seconds = time.perf_counter() - tick
        mean, low = score(reference, embeddings(make_session(model), heldout))
        layers = report.passes[-1].details["layers"]
        branch = sum(layer["lowrank"]["bytes"] for layer in layers if "lowrank" in layer)
        codes = sum(params[layer["linear"]] / 2 for layer in layers if "lowrank" in layer)
        ratio = f"{branch / codes:.3f}" if codes else ""
        lines.append(f"| `{pipeline.replace(GPTQ, 'gptq')}` | {mean:.4f} | {low:.4f} | {ratio} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    if args.write:
        stamp = machine_stamp(".venv/bin/python benchmarks/lowrank.py --write") + (
            f" `gptq` stands for `{GPTQ}`. Mean (min) cosine to FP32 of held-out sentence embeddings.")
        replace_section("lowrank", "Measured on MiniLM", f"{stamp}\n\n{table}", page=PAGE)


if __name__ == "__main__":
    main()
