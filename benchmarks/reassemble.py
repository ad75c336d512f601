"""reassemble (QLLM) on MiniLM beside smooth and rotate: held-out fidelity, ORT latency, the channels it adds.

    .venv/bin/python benchmarks/reassemble.py [--write] [--runs N]

Artifacts, data and latency as benchmarks/minilm_pipelines.py measures them (ORT backend,
interleaved runs, ratios to FP32). "added MACs" is the linears' multiply-adds the split
channels add (the report's ``added_macs_share``); "groups" how many linear groups took a
channel map. ``--write`` regenerates the table in docs/passes/reassemble.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from minilm_pipelines import arguments, compile_and_measure, publish  # noqa: E402

PAGE = Path(__file__).resolve().parents[1] / "docs" / "passes" / "reassemble.md"
PIPELINES = ["w8a8", "smooth(search=true),w8a8", "reassemble,w8a8", "reassemble(assemble=true),w8a8",
             "rotate,w8a8", "reassemble,rotate,w8a8", "w8a8-dyn", "reassemble,w8a8-dyn",
             "w4a4", "reassemble,w4a4", "reassemble(assemble=true),w4a4", "reassemble(growth=0.5),w4a4"]


def main() -> None:
    args = arguments(__doc__.splitlines()[0], PAGE)
    measured = compile_and_measure(PIPELINES, args.runs)
    lines = [f"{measured.header()} added MACs | groups | compile s |", "|---|" + "---:|" * (5 + len(measured.latency))]
    for name, row in measured.rows():
        added = groups = compile_s = ""
        if name in measured.results:
            records = [p for p in measured.results[name].report.passes if p.name == "reassemble"]
            if records:
                added = f"{records[0].details['added_macs_share']:.3f}"
                groups = str(len(records[0].details["transformed"]))
            compile_s = f"{measured.seconds[name]:.0f}"
        lines.append(f"{row} {added} | {groups} | {compile_s} |")
    publish(lines, "reassemble.py", "reassemble", PAGE, args)


if __name__ == "__main__":
    main()
