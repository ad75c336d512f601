"""The recipe search on MiniLM: which pipeline meets a fidelity target at the least latency, and what it explored.

    .venv/bin/python benchmarks/search.py [--target "cos>=0.998"] [--backend ort|tvm] [--budget 15m] [--write]

Runs `qcompiler.search` as ``qcompile minilm --search TARGET --backend B`` does, on the
built-in calibration sentences (fidelity on their held-out split), and prints every trial
(fidelity, latency as a ratio to FP32 timed interleaved in one process, weight bytes,
compile seconds), the chosen pipeline and the whole search's wall time. ``--write``
regenerates the section of docs/benchmarks.md for that backend and copies the
frontier plot beside it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from docs_section import BENCHMARKS_PAGE, machine_stamp, replace_section  # noqa: E402
from qcompiler.recipe_search import TargetNotMet, search  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cos>=0.998")
    parser.add_argument("--backend", default="ort", choices=["ort", "tvm"])
    parser.add_argument("--budget", default="15m")
    parser.add_argument("--write", action="store_true", help="rewrite this backend's search section of docs/benchmarks.md")
    args = parser.parse_args()

    out = Path(tempfile.mkdtemp(prefix="qcompiler-search-bench-")) / "artifact"
    try:
        result = search("minilm", args.target, backend=args.backend, budget=args.budget, output=out, log=print)
        verdict = (f"Chosen: `{result.winner.pipeline}`, {result.target.metric.name} {result.winner.value:.5f} at "
                   f"{result.winner.latency_ratio:.2f}x FP32 latency")
    except TargetNotMet as refused:
        result, verdict = refused.result, f"No candidate met the target: {refused}"
    unexplored = f"; left unexplored by the budget: {', '.join(result.unexplored)}" if result.unexplored else ""
    summary = (f"{verdict}. {len(result.trials)} trials, the whole search (normalize, calibration, compiles, "
               f"timing) {result.seconds / 60:.1f} min{unexplored}.")
    table = "\n".join(result.table())
    print(table, summary, sep="\n\n")
    if args.write:
        figure = f"search-{args.backend}.png"
        if (out / "search.png").exists():
            shutil.copy(out / "search.png", BENCHMARKS_PAGE.parent / figure)
        command = f".venv/bin/python benchmarks/search.py --target \"{args.target}\" --backend {args.backend} --write"
        stamp = machine_stamp(command) + (f" MiniLM, target `{args.target}` on the held-out split of the built-in "
                                          f"calibration sentences, latency at batch {result.shape[0]} x "
                                          f"{result.shape[1]}, every trial interleaved with FP32 in one process.")
        replace_section(f"search-{args.backend}", f"Recipe search ({args.backend})",
                        f"{stamp}\n\n{table}\n\n{summary}\n\n![frontier]({figure})")
    shutil.rmtree(out.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
