"""affine (FlatQuant) on MiniLM beside rotate: held-out fidelity, ORT latency and the online transforms' share of it.

    .venv/bin/python benchmarks/affine.py [--write] [--runs N]

Same calibration and held-out sentences as benchmarks/fidelity.py; every artifact is the
ORT backend's, fidelity measured on the kernels onnxruntime runs. Latency: batches of 8 x 128
and 1 x 128 tokens, every model in one process with runs interleaved, as ratios to FP32.
"online share" is FlatQuant's figure: the part of the artifact's 1 x 128 latency its online
transforms (the ``qcompiler.Hadamard`` Kronecker nodes, rotate's or affine's) take, measured
against the same artifact with those nodes bypassed (not equivalent, timed only).
``--write`` regenerates the table in docs/passes/affine.md.
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
from fidelity import embeddings, score  # noqa: E402
from qcompiler.benchmarking import compare_latency, synthetic_feeds  # noqa: E402
from qcompiler.calibration import data as calib_data  # noqa: E402
from qcompiler.calibration.resolve import builtin_sentences, model_inputs  # noqa: E402
from qcompiler.capture import load_tokenizer  # noqa: E402
from qcompiler.compiler import compile as run_compile  # noqa: E402
from qcompiler.graph import redirect_uses  # noqa: E402
from qcompiler.online_rotation import DOMAIN, OP  # noqa: E402
from qcompiler.runtime import make_session  # noqa: E402

PAGE = Path(__file__).resolve().parents[1] / "docs" / "passes" / "affine.md"
PIPELINES = ["w4a4", "rotate,w4a4", "rotate,w4a4(weights=gptq)", "affine,w4a4", "affine,w4a4(weights=gptq)",
             "rotate,w8a8", "affine,w8a8"]
SHAPES = ((8, 128), (1, 128))


def without_online_transforms(model: ir.Model) -> ir.Model | None:
    """A copy of ``model`` with every Kronecker node bypassed (None when it has none)."""
    copy = ir.from_proto(ir.to_proto(model))
    nodes = [n for n in copy.graph if (n.domain, n.op_type) == (DOMAIN, OP)]
    for node in nodes:
        redirect_uses(copy.graph, node.outputs[0], node.inputs[0])
        copy.graph.remove(node, safe=True)
    return copy if nodes else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the table in docs/passes/affine.md")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="qcompiler-affine-"))
    fp32 = run_compile("minilm", "", verify=False).model
    fp32_path = folder / "fp32.onnx"
    ir.save(fp32, fp32_path)
    tokenizer, inputs = load_tokenizer("minilm"), model_inputs(fp32)
    data = calib_data.from_sentences(builtin_sentences("calibration"), tokenizer, inputs)
    heldout = calib_data.from_sentences(builtin_sentences("heldout"), tokenizer, inputs).batches
    reference = embeddings(make_session(fp32), heldout)

    models, seconds, bypassed = {"fp32": fp32}, {}, {}
    for pipeline in PIPELINES:
        tick = time.perf_counter()
        result = run_compile(ir.load(fp32_path), pipeline, calib=data, normalize=False, backend="ort", verify=False)
        seconds[pipeline] = time.perf_counter() - tick
        models[pipeline] = result.model
        if (stripped := without_online_transforms(result.model)) is not None:
            bypassed[pipeline] = stripped
        print(f"compiled {pipeline} in {seconds[pipeline]:.0f} s", flush=True)

    fidelity = {name: score(reference, embeddings(make_session(model, fuse_qdq=True), heldout))
                for name, model in models.items()}
    latency = {shape: compare_latency(models, synthetic_feeds(fp32, *shape), args.runs) for shape in SHAPES}
    pairs = {f"{name} {kind}": model for name in bypassed
             for kind, model in (("with", models[name]), ("without", bypassed[name]))}
    online = compare_latency(pairs, synthetic_feeds(fp32, 1, 128), args.runs) if pairs else {}
    header = "".join(f" {b}x{s} / fp32 |" for b, s in SHAPES)
    lines = [f"| model | mean cosine | min cosine |{header} online share | compile s |",
             "|---|" + "---:|" * (4 + len(SHAPES))]
    for name in models:
        label = name if name == "fp32" else f"`{name}`"
        cells = "".join(f" {latency[shape][name]['ratio']:.2f} |" for shape in SHAPES)
        share = ""
        if name in bypassed:
            share = f"{1 - online[f'{name} without']['median_ms'] / online[f'{name} with']['median_ms']:.2f}"
        mean, low = fidelity[name]
        compile_s = f"{seconds[name]:.0f}" if name in seconds else ""
        lines.append(f"| {label} | {mean:.5f} | {low:.4f} |{cells} {share} | {compile_s} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        stamp = machine_stamp(".venv/bin/python benchmarks/affine.py --write") + (
            f" Mean (min) cosine to FP32 of held-out sentence embeddings; {args.runs} interleaved runs per model.")
        replace_section("affine", "Measured on MiniLM", f"{stamp}\n\n{table}", page=PAGE)


if __name__ == "__main__":
    main()
