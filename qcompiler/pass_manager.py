"""Run a pipeline of passes over a model, verifying and recording each one.

Before the first pass the manager runs the held-out calibration batches through the
model; after every function-preserving pass it runs them again and compares, per
output and at real (unpadded) tokens, max abs error, relative error and cosine with the
outputs before that pass.
Above the tolerance it stops with an error that names the pass. Every pass gets a
`PassRecord`: wall time, node and initializer changes, verification, statistics used.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import onnx_ir as ir

from qcompiler.calibration.data import CalibrationData, real_token_runs
from qcompiler.calibration.engine import DEFAULT_MEMORY_BUDGET, CalibrationEngine
from qcompiler.errors import VerificationError, blame_qcompiler
from qcompiler.pass_api import Pass, PassContext
from qcompiler.pipeline import format_pipeline
from qcompiler.progress import logger
from qcompiler.quant.presets import Scheme
from qcompiler.report import PassRecord, Report
from qcompiler.decoding import cache_layout, prompt_and_step
from qcompiler.runtime import make_session, run_batches
from qcompiler.verify import compare_outputs, worst

DEFAULT_TOLERANCE = 1e-4
# Normalization's passes take well under a second each: naming them on the console is noise.
QUIET_PASSES = {"convert-opset", "simplify", "fuse-norms", "fuse-gelu", "canonical-linear"}


@dataclass
class PassManager:
    passes: Sequence[Pass]
    calibration: CalibrationData | None = None
    tolerance: float = DEFAULT_TOLERANCE
    verify: bool = True
    holdout_fraction: float = 0.25
    # What the calibration engine may hold at once: exposed activations per run, X^T X statistics.
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    progress: bool = True
    log: Callable[[str], None] = logger.info
    # Called after every pass with (pass, model, context): observers such as the channel trace.
    after_pass: Callable[[Pass, ir.Model, PassContext], None] | None = None
    engine: CalibrationEngine | None = field(init=False, default=None)
    holdout: CalibrationData | None = field(init=False, default=None)
    # Outputs of the model as given, on the held-out batches (None without verification).
    reference_outputs: list | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.calibration is not None:
            calib_part, self.holdout = self.calibration.split(self.holdout_fraction)
            self.engine = CalibrationEngine(calib_part, memory_budget=self.memory_budget, progress=self.progress,
                                            log=self.log)

    def run(self, model: ir.Model, source: str = "") -> Report:
        """Apply every pass to ``model`` in place and return the report."""
        start = time.perf_counter()
        report = Report(source=source, pipeline=format_pipeline(self.passes))
        if self.calibration is not None and self.engine is not None and self.holdout is not None:
            report.calibration = {
                "source": self.calibration.source,
                "calibration_batches": len(self.engine.data),
                "holdout_batches": len(self.holdout),
            }
        checking = self.verify and self.holdout is not None
        if self.verify and self.holdout is None:
            report.notes.append("outputs were not verified: no calibration data to hold out")
        # The reference outputs also score the compiled model's fidelity, verified or not.
        previous = self._outputs(model) if self.holdout is not None else None
        self.reference_outputs = previous
        ctx = PassContext(self.engine, self.holdout, report, log=self.log, show_progress=self.progress)
        for index, pass_ in enumerate(self.passes):
            record = PassRecord(pass_.name, pass_.spec(), pass_.preserves_function)
            ctx.record = record
            ctx.target = _target_after(self.passes, index)
            report.passes.append(record)
            if pass_.name not in QUIET_PASSES:
                self.log(f"{pass_.name} ...")
            before = _snapshot(model)
            tick = time.perf_counter()
            needed = pass_.statistics(model)
            if needed:
                ctx.statistics(model, needed)
            outcome = pass_.run(model, ctx)
            record.seconds = time.perf_counter() - tick
            record.modified, record.details, record.findings = outcome.modified, outcome.details, outcome.findings
            _record_changes(record, before, _snapshot(model))
            if checking and outcome.modified:
                with blame_qcompiler(f"in pass '{pass_.name}'"):
                    current = self._outputs(model)
                # At real tokens, as the compile's fidelity: padding positions compute values nothing reads.
                batches = self.holdout.batches
                record.verification = compare_outputs(real_token_runs(previous, batches),
                                                      real_token_runs(current, batches))
                if pass_.preserves_function:
                    self._check(pass_, record)
                previous = current
            if self.after_pass is not None:
                self.after_pass(pass_, model, ctx)
        if self.engine is not None:
            report.calibration["collections"] = [vars(r) for r in self.engine.records]
        report.total_seconds = time.perf_counter() - start
        return report

    def outputs(self, model: ir.Model):
        """``model``'s outputs on the held-out batches."""
        return self._outputs(model)

    def _outputs(self, model: ir.Model):
        session = make_session(model)
        layout = cache_layout(model)
        if layout is not None:
            return prompt_and_step(session, layout, self.holdout.batches)
        return run_batches(session, self.holdout.batches)

    def _check(self, pass_: Pass, record: PassRecord) -> None:
        output, errors = worst(record.verification)
        if errors["relative_error"] > self.tolerance:
            raise VerificationError(
                f"Pass '{pass_.name}' changed output '{output}' by relative error {errors['relative_error']:.3g} "
                f"(max abs {errors['max_abs_error']:.3g}, cosine {errors['cosine']:.6f}), above the tolerance "
                f"{self.tolerance:g}."
            )


def _target_after(passes: Sequence[Pass], index: int) -> Scheme | None:
    """What the first later pass that has a wish (`Pass.optimizes_for`) asks ``passes[index]`` to optimize for."""
    for later in passes[index + 1:]:
        target = later.optimizes_for()
        if target is not None:
            return target
    return None


@dataclass
class _Snapshot:
    nodes: dict[int, ir.Node]
    initializers: dict[str, Callable[[], object]]  # weak references to the tensors


def _snapshot(model: ir.Model) -> _Snapshot:
    """Nodes are kept referenced (so their ids cannot be reused while comparing); tensors only weakly: a pass that
    rewrites every weight must be able to free each old one as it goes, or it holds the model's weights twice."""
    return _Snapshot({id(n): n for n in model.graph},
                     {name: _weak(v.const_value) for name, v in model.graph.initializers.items()})


def _weak(tensor: object) -> Callable[[], object]:
    return (lambda: None) if tensor is None else weakref.ref(tensor)


def _record_changes(record: PassRecord, before: _Snapshot, after: _Snapshot) -> None:
    record.nodes_before, record.nodes_after = len(before.nodes), len(after.nodes)
    record.nodes_added = len(after.nodes.keys() - before.nodes.keys())
    record.nodes_removed = len(before.nodes.keys() - after.nodes.keys())
    record.initializers_added = len(after.initializers.keys() - before.initializers.keys())
    record.initializers_removed = len(before.initializers.keys() - after.initializers.keys())
    record.initializers_changed = sum(
        1 for name in before.initializers.keys() & after.initializers.keys()
        if before.initializers[name]() is not after.initializers[name]()
    )
