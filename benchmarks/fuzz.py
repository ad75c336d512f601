"""Fuzz qcompiler with random graphs over its op vocabulary: internal errors, equivalence violations, refusals.

    .venv/bin/python benchmarks/fuzz.py [--examples 200] [--runs 4] [--seed 0] [--save DIR] [--tvm 0]

Draws ``--examples`` models from `tests.strategies.fuzz_cases` (transformer blocks and
small CNNs, opsets 11-23, symbolic batch and sequence) and pushes each through
``--runs`` pipelines drawn from every function-preserving pass (verified, then compared
with the source on fresh inputs) and every preset on the simulate and ort backends
(compiled into an artifact, opened and run). ``--tvm K`` adds K runs on the TVM backend
(slow to build). Prints how many graphs and runs, refusals grouped by reason (first
sentence, numbers and quoted names masked) and failures, which should be none. Each kind
of failure is shrunk to the smallest graph hypothesis finds failing the same way and, with
``--save``, written there as ``<n>.onnx`` with a ``<n>.txt`` saying how to reproduce it.
The test suite runs the same checks on a fixed-seed budget (tests/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)  # onnxscript's converter logs a warning for every opset < 18 model

import onnx  # noqa: E402
from hypothesis import HealthCheck, Phase, find, given, seed, settings  # noqa: E402
from hypothesis.errors import NoSuchExample  # noqa: E402

from tests.strategies import (BACKENDS, PRESERVING, PRESETS, FuzzCase, Outcome, check_preserving,  # noqa: E402
                              check_preset, fuzz_cases)

RUNS = [(p, "simulate") for p in PRESERVING] + [(p, b) for p in PRESETS for b in BACKENDS]


def check(case: FuzzCase, pipeline: str, backend: str) -> Outcome:
    return check_preserving(case, pipeline) if pipeline in PRESERVING else check_preset(case, pipeline, backend)


def reason(message: str) -> str:
    """A message's first sentence with numbers, quoted names and numbered names masked, so one cause is one row."""
    first = re.split(r"(?<=[.;])\s", message, maxsplit=1)[0]
    return re.sub(r"\b\w*\d[\w.+-]*", "N", re.sub(r"'[^']*'", "'…'", first))


def shrink(case: FuzzCase, outcome: Outcome, budget: int) -> tuple[FuzzCase, Outcome]:
    """The smallest model hypothesis finds that fails ``outcome``'s run for the same reason, and its outcome.

    ``case`` itself where none is found, and for TVM, whose builds are too slow to shrink.
    """
    wanted = reason(outcome.message)
    if outcome.backend == "tvm":
        return case, outcome

    def same_failure(candidate: FuzzCase) -> bool:
        found = check(candidate, outcome.pipeline, outcome.backend)
        return found.status == "failed" and reason(found.message) == wanted

    try:
        smallest = find(fuzz_cases(), same_failure, settings=settings(max_examples=budget, database=None,
                                                                       deadline=None,
                                                                       suppress_health_check=list(HealthCheck)))
    except NoSuchExample:
        return case, outcome
    return smallest, check(smallest, outcome.pipeline, outcome.backend)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="graphs to draw")
    parser.add_argument("--runs", type=int, default=4, help="pipelines per graph, drawn from every pass and preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, help="folder for the smallest failing model of each kind of failure")
    parser.add_argument("--tvm", type=int, default=0, help="extra runs on the TVM backend (each builds a library)")
    parser.add_argument("--shrink", type=int, default=60, help="examples hypothesis may try to shrink each failure")
    args = parser.parse_args()

    outcomes: list[tuple[FuzzCase, Outcome]] = []
    tvm_left = [args.tvm]
    kinds = collections.Counter()

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=fuzz_cases())
    def explore(case: FuzzCase) -> None:
        # Runs are dealt round-robin, so every pass and preset gets its share of the graphs.
        graph = sum(kinds.values())
        kinds[case.description.split()[0]] += 1
        runs = [RUNS[(graph * args.runs + i) % len(RUNS)] for i in range(args.runs)]
        if tvm_left[0] > 0 and case.description.startswith("transformer"):
            tvm_left[0] -= 1
            runs.append((PRESETS[tvm_left[0] % len(PRESETS)], "tvm"))
        for pipeline, backend in runs:
            outcomes.append((case, check(case, pipeline, backend)))

    start = time.perf_counter()
    explore()
    seconds = time.perf_counter() - start

    per_run = collections.defaultdict(collections.Counter)
    for _, outcome in outcomes:
        per_run[(outcome.pipeline, outcome.backend)][outcome.status] += 1
    refusals = collections.Counter(reason(o.message) for _, o in outcomes if o.status == "refused")
    failures: dict[tuple[str, str, str], tuple[FuzzCase, Outcome, int]] = {}
    for case, outcome in outcomes:
        if outcome.status == "failed":
            key = (outcome.pipeline, outcome.backend, reason(outcome.message))
            first, kept, count = failures.get(key, (case, outcome, 0))
            failures[key] = (first, kept, count + 1)

    print(f"# Fuzzing: {sum(kinds.values())} graphs ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}), "
          f"{len(outcomes)} runs, seed {args.seed}, {seconds:.0f} s\n")
    print(table(["pipeline", "backend", "runs", "ok", "refused", "failed"],
                [[f"`{p}`", b, sum(c.values()), c["ok"], c["refused"], c["failed"]]
                 for (p, b), c in sorted(per_run.items())]))
    print("\n## Refusals by reason\n")
    print(table(["reason", "runs"], [[r, n] for r, n in refusals.most_common()]) if refusals else "none")
    print(f"\n## Failures: {sum(n for *_, n in failures.values())}\n")
    if not failures:
        return
    rows = []
    for index, ((pipeline, backend, why), (case, outcome, count)) in enumerate(sorted(failures.items())):
        saved = ""
        if args.save:
            smallest, failed = shrink(case, outcome, args.shrink)
            args.save.mkdir(parents=True, exist_ok=True)
            onnx.save(smallest.model, args.save / f"{index}.onnx")
            (args.save / f"{index}.txt").write_text(
                f"qcompiler.compile('{index}.onnx', '{pipeline}', backend='{backend}', calib=<4 batches of "
                f"standard-normal inputs {smallest.inputs}, batch 2, seq 5>)\n{failed.message}\n"
                f"{smallest.description}\n")
            saved = str(args.save / f"{index}.onnx")
        rows.append([f"`{pipeline}`", backend, count, why.replace("|", "\\|"), saved])
    print(table(["pipeline", "backend", "runs", "failure", "smallest model"], rows))


if __name__ == "__main__":
    main()
