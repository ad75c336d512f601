"""Recipe search: the least-latency pipeline that meets a fidelity target on the backend it will run on.

    result = qcompiler.search("minilm", "cos>=0.998", backend="ort", budget=1200, output="out/")

The user states what they need (``cos>=0.998``: held-out mean sentence-embedding cosine;
``top1>=0.95``, ``kl<=0.05`` or ``ppl<=1.05`` for causal LMs; ``out-cos>=0.99`` for any
model) and the compiler chooses the transforms and the precision. Candidates are pipelines: each transform recipe (none,
``smooth``, ``rotate``, ``smooth,rotate``, the last two with ``rotate(online=activations)``,
online Hadamards only where activations are hardest: a coarse per-region choice, and
``reassemble``, QLLM's outlier channel splits with theta searched per linear group) under
each preset (int8 static, int8 dynamic, W4A8, W4A16); then, for the fastest candidates
that missed the target, refinements of their quantize step, per layer where it counts:
4-bit presets get GPTQ rounding and their most output-sensitive linears at 8 bits, static
int8 gets a clipping observer and its most sensitive linears on dynamic activations
(``fallback``, the quantize pass's measured per-layer ranking).

Every trial is one call of `run_trial` (a picklable spec in, a picklable result out, an
artifact folder on disk) so a distributed runner can map it unchanged; fidelity is the
compile's own held-out score on the calibration split. Latency is never estimated: every
artifact that compiled is timed on the target backend against FP32 in one process, runs
interleaved, after the trials (timing trials while others compile would measure the
neighbours). The answer is the fastest trial meeting the target (fewer bytes breaking
ties); the frontier (fidelity against latency against bytes) is printed and written
beside the winning artifact as ``search.json``, ``search.png`` and a section of
``report.md``. No candidate meeting the target is `TargetNotMet` (one sentence, exit 2
from the CLI) and writes nothing, unless ``best_effort`` asks for the closest one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import onnx_ir as ir

from qcompiler import artifact, compiler
from qcompiler.backend import Backend, make_backend
from qcompiler.calibration.data import CalibrationData
from qcompiler.calibration.resolve import resolve_calibration
from qcompiler.capture import load
from qcompiler.decoding import cache_layout
from qcompiler.errors import QCompilerError
from qcompiler.pass_manager import PassManager
from qcompiler.pipeline import format_pipeline, parse_pipeline
from qcompiler.progress import logger
from qcompiler.search_target import METRICS, Target, parse_budget, parse_target

# The transform recipes of the first round. rotate(online=activations) keeps only the online
# Hadamards in front of the FFN's second linear, the costliest activations to quantize.
TRANSFORMS = ("", "smooth", "rotate", "smooth,rotate", "rotate(online=activations)",
              "smooth,rotate(online=activations)", "reassemble")
PRESETS = ("w8a8", "w8a8-dyn", "w4a8", "w4a16")
# Per candidate that missed the target, by its preset: for 4-bit weights better rounding,
# then a growing share of the most sensitive weights at 8 bits; for static int8 activations
# a range observer that clips, then a growing share of the most sensitive linears on
# dynamic per-token activations (the quantize pass's measured ``fallback`` ranking).
REFINEMENTS = {
    "w4a8": ("weights=gptq", "fallback=0.1", "weights=gptq,fallback=0.1", "fallback=0.3"),
    "w4a16": ("weights=gptq", "fallback=0.1", "weights=gptq,fallback=0.1", "fallback=0.3"),
    "w8a8": ("observer=mse", "fallback=0.1", "fallback=0.25", "fallback=0.5"),
}
REFINED_BASES = 3  # the fastest misses refined
DEFAULT_SHAPE = (8, 128)
OUT_OF_BUDGET = "not started: the search budget was spent"


# --- one trial ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialSpec:
    """Everything one compile needs, all picklable: a normalized model file, not an in-memory graph."""

    model: str
    pipeline: str
    calibration: CalibrationData
    backend: str
    backend_options: dict
    folder: str
    metric: str
    deadline: float | None = None  # time.time() after which the trial is not started


@dataclass
class TrialResult:
    pipeline: str
    folder: str | None
    value: float | None = None  # the target metric on the held-out calibration split
    weight_bytes: int | None = None  # the artifact's weights without its embedding tables
    compile_seconds: float = 0.0
    error: str | None = None
    median_ms: float | None = None
    latency_ratio: float | None = None  # to FP32, timed interleaved with it


def run_trial(spec: TrialSpec) -> TrialResult:
    """Compile one candidate into ``spec.folder``; a candidate the compiler refuses records its sentence."""
    if spec.deadline is not None and time.time() > spec.deadline:
        return TrialResult(spec.pipeline, None, error=OUT_OF_BUDGET)
    tick = time.perf_counter()
    try:
        result = compiler.compile(spec.model, spec.pipeline, calib=spec.calibration, normalize=False, verify=False,
                             backend=spec.backend, output=spec.folder, log=lambda _: None, **spec.backend_options)
    except QCompilerError as exc:
        return TrialResult(spec.pipeline, None, error=str(exc), compile_seconds=time.perf_counter() - tick)
    sizes = result.manifest["weight_bytes"]
    return TrialResult(spec.pipeline, spec.folder, METRICS[spec.metric].read(result.manifest["fidelity"]),
                       sizes["artifact"] - sizes["embeddings"], time.perf_counter() - tick)


# --- the search ---------------------------------------------------------------------------------------------------

@dataclass
class SearchResult:
    target: Target
    backend: str
    trials: list[TrialResult]
    frontier: list[TrialResult]
    winner: TrialResult | None
    output: Path | None
    unexplored: list[str] = field(default_factory=list)  # candidates the budget left out
    shape: tuple[int, int] = DEFAULT_SHAPE
    seconds: float = 0.0

    def warning(self) -> str | None:
        """A sentence when the chosen artifact is slower than the FP32 source (a CNN on onnxruntime, say)."""
        if self.winner is None or self.winner.latency_ratio is None or self.winner.latency_ratio < 1:
            return None
        return (f"the chosen artifact runs at {self.winner.latency_ratio:.2f}x the FP32 latency on {self.backend}: "
                "no candidate was faster than the source here, so it buys size, not speed")

    def columns(self) -> list[str]:
        return ["pipeline", self.target.metric.name, "latency / fp32", "ms", "weight MB", "compile s", ""]

    def rows(self) -> list[list[str]]:
        """One row of cells per trial, fastest first; frontier and chosen trials marked."""
        rows = []
        for trial in sorted(self.trials, key=_latency_key):
            if trial.error:
                rows.append([trial.pipeline, "", "", "", "", f"{trial.compile_seconds:.0f}", f"refused: {trial.error}"])
                continue
            role = "chosen" if trial is self.winner else "frontier" if trial in self.frontier else ""
            meets = "meets the target" if self.target.met(trial.value) else ""
            rows.append([trial.pipeline, _fmt(trial.value, ".5f"), _fmt(trial.latency_ratio, ".2f"),
                         _fmt(trial.median_ms, ".1f"), f"{trial.weight_bytes / 1e6:.1f}",
                         f"{trial.compile_seconds:.0f}", ", ".join(filter(None, (role, meets)))])
        return rows

    def table(self) -> list[str]:
        """The trials as a markdown table."""
        lines = ["| " + " | ".join(self.columns()) + " |", "|---|" + "---:|" * 5 + "---|"]
        return lines + [f"| `{row[0]}` | " + " | ".join(row[1:]) + " |" for row in self.rows()]

    def to_json(self) -> dict:
        return {"target": str(self.target), "metric": self.target.metric.meaning, "backend": self.backend,
                "shape": list(self.shape), "seconds": self.seconds,
                "winner": self.winner.pipeline if self.winner else None,
                "met": self.winner is not None and self.target.met(self.winner.value),
                "frontier": [t.pipeline for t in self.frontier], "unexplored": self.unexplored,
                "trials": [{k: v for k, v in dataclasses.asdict(t).items() if k != "folder"} for t in self.trials]}


class TargetNotMet(QCompilerError):
    """No candidate met the target: the user's requirement, not a fault; the result carries the frontier."""

    def __init__(self, message: str, result: SearchResult):
        super().__init__(message)
        self.result = result


def candidates(transforms: Iterable[str] = TRANSFORMS, presets: Iterable[str] = PRESETS) -> list[str]:
    """The first round: every transform recipe under every preset."""
    return [",".join(p for p in (transform, preset) if p) for preset in presets for transform in transforms]


def refinements(pipeline: str) -> list[str]:
    """Variants of a first-round pipeline's quantize step (`REFINEMENTS`); none for a dynamic int8 preset."""
    *transforms, preset = pipeline.split(",")
    return [",".join([*transforms, f"{preset}({options})"]) for options in REFINEMENTS.get(preset, ())]


def search(model: Any, target: str | Target, *, example_inputs: Any = None, calib: Any = None,
           tokenizer: str | os.PathLike | None = None, backend: str = "ort", budget: str | float | None = None,
           output: str | os.PathLike | None = None, force: bool = False, best_effort: bool = False,
           transforms: Iterable[str] = TRANSFORMS, presets: Iterable[str] = PRESETS, refine: bool = True,
           shape: tuple[int, int] = DEFAULT_SHAPE, runs: int = 20, batch_size: int = 8, max_length: int = 128,
           map_trials: Callable[[Callable[[TrialSpec], TrialResult], list[TrialSpec]], list[TrialResult]] | None = None,
           log: Callable[[str], None] = logger.info, **backend_options: Any) -> SearchResult:
    """Search pipelines for the fastest one meeting ``target`` on ``backend``; write it to ``output`` if given.

    ``model``, ``example_inputs``, ``calib`` and ``tokenizer`` are what `qcompiler.compile` takes.
    ``transforms`` and ``presets`` span the first round; ``shape`` is the (batch, sequence)
    timed where the artifact takes any; ``runs`` the timed runs per trial. ``budget``
    (seconds, or ``"20m"``) bounds the compiles: no trial starts once it is spent, and the
    ones left out are listed. ``map_trials(run_trial, specs)`` runs a round of trials
    (default: one after another, here); a distributed runner passes its own.
    Raises `TargetNotMet` when nothing meets the target, unless ``best_effort``, which
    writes the closest candidate instead.
    """
    started = time.perf_counter()
    goal = target if isinstance(target, Target) else parse_target(target)
    seconds = parse_budget(budget)
    chosen = make_backend(backend, **backend_options)
    target_dir = Path(output) if output is not None else None
    if target_dir is not None:
        artifact.check_output_dir(target_dir, force)
    work = Path(tempfile.mkdtemp(prefix="qcompiler-search-"))
    try:
        source = load(model, example_inputs)
        if source is model:  # an ir.Model the caller holds: normalize a copy, not their graph
            source = ir.from_proto(ir.to_proto(model))
        causal = cache_layout(source) is not None
        if goal.metric.causal not in (None, causal):
            kind = "a causal LM" if causal else "a model without a KV cache"
            fits = [m.name for m in METRICS.values() if m.causal in (None, causal)]
            raise QCompilerError(f"The target metric '{goal.metric.name}' does not apply to {kind}; use one of "
                                 f"{', '.join(fits)}.")
        normalized = _normalize(source, work / "normalized.onnx")
        data = resolve_calibration(calib, normalized, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        if data is None:
            raise QCompilerError("The search scores candidates on held-out calibration data, and this model carries no "
                                 "tokenizer: give --calib (an .npz of inputs, or text with --tokenizer).")
        runner = map_trials or (lambda function, specs: [function(spec) for spec in specs])
        deadline = None if seconds is None else time.time() + seconds - (time.perf_counter() - started)
        trials: list[TrialResult] = []
        unexplored: list[str] = []
        serial = itertools.count()  # one scratch folder per spec, across rounds

        def run_round(pipelines: list[str]) -> None:
            specs = [TrialSpec(str(work / "normalized.onnx"), pipeline, data, chosen.name, dict(backend_options),
                               str(work / f"trial-{next(serial):02d}"), goal.metric.name, deadline)
                     for pipeline in pipelines]
            for done in runner(run_trial, specs):
                if done.error == OUT_OF_BUDGET:
                    unexplored.append(done.pipeline)
                    continue
                trials.append(done)
                shown = done.error or f"{goal.metric.name} {_fmt(done.value, '.5f')}"
                log(f"search: {done.pipeline}: {shown} ({done.compile_seconds:.0f} s)")

        run_round(candidates(transforms, presets))
        if any(t.error is None for t in trials) and all(t.value is None for t in trials):
            raise QCompilerError(f"The target metric '{goal.metric.name}' ({goal.metric.meaning}) does not apply to "
                                 "this model: it has no sentence-embedding output (a [batch, tokens, hidden] output "
                                 "beside an attention mask input); use out-cos, the worst output cosine.")
        bench = _time_trials(trials, normalized, chosen, shape, runs)
        if refine:
            best = _winner(trials, goal)
            misses = [t for t in sorted(trials, key=_latency_key) if t.latency_ratio is not None
                      and not goal.met(t.value) and refinements(t.pipeline)
                      and (best is None or t.latency_ratio < best.latency_ratio)]
            extra = [p for t in misses[:REFINED_BASES] for p in refinements(t.pipeline)]
            if extra:
                run_round(extra)
                bench = _time_trials(trials, normalized, chosen, shape, runs)  # every ratio from one interleaved run
        winner = _winner(trials, goal)
        result = SearchResult(goal, chosen.name, trials, _frontier(trials, goal), winner, None, unexplored, bench,
                              time.perf_counter() - started)
        if winner is None:
            closest = max((t for t in trials if t.error is None), key=lambda t: goal.better(t.value), default=None)
            if closest is None or not best_effort:
                best = "" if closest is None else f" (closest: {closest.pipeline} at {goal.metric.name} " \
                                                  f"{_fmt(closest.value, '.5f')})"
                left = f", {len(unexplored)} left unexplored by the budget" if unexplored else ""
                raise TargetNotMet(f"No candidate met {goal} on {chosen.name} among {len(trials)} tried{left}{best}; "
                                   "nothing was written (--best-effort writes the closest).", result)
            result.winner = closest
        if target_dir is not None:
            _commit(Path(result.winner.folder), target_dir, result, model if isinstance(model, (str, os.PathLike))
                    else source, force)
            result.output = target_dir
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _normalize(source: ir.Model, path: Path) -> ir.Model:
    """The normalize preset, once for every trial (each then starts from this file)."""
    PassManager(parse_pipeline(compiler.NORMALIZE), calibration=None, verify=False, progress=False,
                log=lambda _: None).run(source)
    artifact.save_model(source, path)
    return ir.load(path)


def _time_trials(trials: list[TrialResult], reference: ir.Model, backend: Backend, shape: tuple[int, int],
                 runs: int) -> tuple[int, int]:
    """Every compiled trial against FP32 in one interleaved run; returns the (batch, sequence) timed."""
    from qcompiler.benchmarking import compare_latency, synthetic_feeds

    timed = [t for t in trials if t.folder is not None]
    sessions: dict[str, Any] = {"fp32": reference}
    for trial in timed:
        path, manifest = artifact.open_artifact(trial.folder)
        static = backend.bench_shape(manifest)
        shape = static or shape
        sessions[trial.pipeline] = backend.session(Path(trial.folder), manifest, ir.load(path), timed=True)
    rows = compare_latency(sessions, synthetic_feeds(reference, *shape), runs)
    for trial in timed:
        trial.median_ms, trial.latency_ratio = rows[trial.pipeline]["median_ms"], rows[trial.pipeline]["ratio"]
    return tuple(shape)


def _latency_key(trial: TrialResult) -> tuple[float, float]:
    latency = trial.latency_ratio if trial.latency_ratio is not None else math.inf
    return latency, trial.weight_bytes if trial.weight_bytes is not None else math.inf


def _winner(trials: list[TrialResult], goal: Target) -> TrialResult | None:
    meeting = [t for t in trials if t.latency_ratio is not None and goal.met(t.value)]
    return min(meeting, key=_latency_key, default=None)


def _frontier(trials: list[TrialResult], goal: Target) -> list[TrialResult]:
    """The trials no other beats on fidelity, latency and bytes at once (Pareto-optimal), fastest first."""
    timed = [t for t in trials if t.latency_ratio is not None]

    def dominates(a: TrialResult, b: TrialResult) -> bool:
        no_worse = (goal.better(a.value) >= goal.better(b.value) and a.latency_ratio <= b.latency_ratio
                    and a.weight_bytes <= b.weight_bytes)
        return no_worse and (goal.better(a.value), -a.latency_ratio, -a.weight_bytes) != \
            (goal.better(b.value), -b.latency_ratio, -b.weight_bytes)

    return sorted((t for t in timed if not any(dominates(o, t) for o in timed)), key=_latency_key)


def _commit(winner: Path, target: Path, result: SearchResult, source: Any, force: bool) -> None:
    """The winning trial's artifact, with the search's table, plot and record, moved into place atomically.

    The trial compiled the normalized copy in the search's scratch folder; the manifest and
    report name the user's model instead, so ``qcompile bench`` finds the real FP32 source.
    """
    artifact.check_output_dir(target, force)  # again: the search took minutes
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        folder = staging / target.name
        shutil.copytree(winner, folder)
        manifest = json.loads((folder / artifact.MANIFEST).read_text(encoding="utf-8"))
        scratch = {key: manifest.pop(key, "") for key in ("source", "sha256")}  # the normalized scratch copy's
        manifest.update(artifact.source_digest(source))
        scratch["pipeline"] = manifest["pipeline"]
        manifest["pipeline"] = f"{format_pipeline(parse_pipeline(compiler.NORMALIZE))},{manifest['pipeline']}"
        report = (folder / "report.md").read_text(encoding="utf-8")
        for key, old in scratch.items():
            report = report.replace(f"- {key}: `{old}`", f"- {key}: `{manifest.get(key, 'not on disk')}`")
        (folder / "report.md").write_text(report, encoding="utf-8")
        record = result.to_json()
        (folder / "search.json").write_text(json.dumps(record, indent=2, default=float) + "\n", encoding="utf-8")
        figures = ["search.png"] if _plot(result, folder / "search.png") else []
        section = [f"## Recipe search: {result.target} on {result.backend}", "",
                   f"{result.target.metric.meaning.capitalize()}, on the held-out calibration split; latency at batch "
                   f"{result.shape[0]} x {result.shape[1]} tokens, every trial interleaved with FP32 in one process.",
                   "", *result.table(), ""]
        if result.warning():
            section += [f"Note: {result.warning()}.", ""]
        section += [f"![{f}]({f})\n" for f in figures]
        with open(folder / "report.md", "a", encoding="utf-8") as handle:
            handle.write("\n".join(section) + "\n")
        manifest["search"] = {k: record[k] for k in ("target", "backend", "winner", "met", "frontier", "shape")}
        artifact.record_files(folder, manifest)
        artifact.replace_dir(folder, target)  # a sibling of target: staging sits beside it
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _plot(result: SearchResult, path: Path) -> bool:
    """Fidelity against latency: a point per timed trial coloured by weight bytes, the best-so-far line, the target."""
    timed = sorted((t for t in result.trials if t.latency_ratio is not None and t.value is not None), key=_latency_key)
    if not timed:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    points = axes.scatter([t.latency_ratio for t in timed], [t.value for t in timed],
                          c=[t.weight_bytes / 1e6 for t in timed], cmap="viridis", s=28, zorder=2)
    figure.colorbar(points, label="weight MB")
    best, steps = -math.inf, []  # fidelity vs latency alone: the best value reachable at each latency
    for trial in timed:
        if result.target.better(trial.value) > best:
            best = result.target.better(trial.value)
            steps.append(trial)
    axes.step([t.latency_ratio for t in steps], [t.value for t in steps], "k--", lw=1, where="post",
              label="best fidelity at this latency")
    for trial in steps:
        axes.annotate(trial.pipeline, (trial.latency_ratio, trial.value), fontsize=7, xytext=(3, -9),
                      textcoords="offset points")
    axes.axhline(result.target.bound, color="tab:red", lw=1, label=str(result.target))
    if result.winner is not None and result.winner.value is not None:
        axes.scatter([result.winner.latency_ratio], [result.winner.value], marker="*", s=220, color="tab:red",
                     label=f"chosen: {result.winner.pipeline}", zorder=3)
    axes.set_xlabel(f"latency / FP32 ({result.backend}, {result.shape[0]}x{result.shape[1]})")
    axes.set_ylabel(result.target.metric.meaning, fontsize=8)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)
