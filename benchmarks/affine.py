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

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx_ir as ir  # noqa: E402

from minilm_pipelines import arguments, compile_and_measure, publish  # noqa: E402
from qcompiler.benchmarking import compare_latency, synthetic_feeds  # noqa: E402
from qcompiler.graph import redirect_uses  # noqa: E402
from qcompiler.online_rotation import DOMAIN, OP  # noqa: E402

PAGE = Path(__file__).resolve().parents[1] / "docs" / "passes" / "affine.md"
PIPELINES = ["w4a4", "rotate,w4a4", "rotate,w4a4(weights=gptq)", "affine,w4a4", "affine,w4a4(weights=gptq)",
             "rotate,w8a8", "affine,w8a8"]


def without_online_transforms(model: ir.Model) -> ir.Model | None:
    """A copy of ``model`` with every Kronecker node bypassed (None when it has none)."""
    copy = ir.from_proto(ir.to_proto(model))
    nodes = [n for n in copy.graph if (n.domain, n.op_type) == (DOMAIN, OP)]
    for node in nodes:
        redirect_uses(copy.graph, node.outputs[0], node.inputs[0])
        copy.graph.remove(node, safe=True)
    return copy if nodes else None


def main() -> None:
    args = arguments(__doc__.splitlines()[0], PAGE)
    measured = compile_and_measure(PIPELINES, args.runs)
    bypassed = {name: stripped for name, model in measured.models.items()
                if name != "fp32" and (stripped := without_online_transforms(model)) is not None}
    pairs = {f"{name} {kind}": model for name in bypassed
             for kind, model in (("with", measured.models[name]), ("without", bypassed[name]))}
    online = compare_latency(pairs, synthetic_feeds(measured.fp32, 1, 128), args.runs) if pairs else {}
    lines = [f"{measured.header()} online share | compile s |", "|---|" + "---:|" * (4 + len(measured.latency))]
    for name, row in measured.rows():
        share = ""
        if name in bypassed:
            share = f"{1 - online[f'{name} without']['median_ms'] / online[f'{name} with']['median_ms']:.2f}"
        compile_s = f"{measured.seconds[name]:.0f}" if name in measured.seconds else ""
        lines.append(f"{row} {share} | {compile_s} |")
    publish(lines, "affine.py", "affine", PAGE, args)


if __name__ == "__main__":
    main()
