"""The pass contract: what a pass is, what it may use while it runs, and what it hands back.

Every pass module and the pass manager import this module; it imports neither the
manager nor the pipeline parser, so ``run(model, ctx)`` can name ``PassContext`` and no
import circle hides behind ``TYPE_CHECKING``.

- `Pass`: a registered ``name``, an ``Options`` dataclass whose fields are its typed
  options, whether it preserves the function, the statistics it needs, ``run``, and
  `Pass.optimizes_for`: the quantization scheme it asks earlier passes to score their
  searches against (the quantize passes answer with their preset's scheme).
- `PassContext`: calibration statistics, calibration batches, the report, and the
  scheme of the next pass that asked to be optimized for (`PassContext.target`).
- `PassOutcome`: whether the model changed, free-form ``details`` for people (the JSON
  report), and typed ``findings`` for code that reads what a pass found (the compiler
  puts quantize's fallback ranking into the manifest from them).
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, ContextManager, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler.calibration.data import CalibrationData
from qcompiler.calibration.engine import CalibrationEngine
from qcompiler.calibration.stats import TensorStats
from qcompiler.errors import QCompilerError
from qcompiler.progress import logger, progress
from qcompiler.quant.presets import Scheme
from qcompiler.report import PassRecord, Report

@dataclass
class NoOptions:
    """Options of a pass that takes none."""


@dataclass
class PassOutcome:
    """What a pass reports back.

    ``details`` is for people (it goes into report.json as it is); anything another stage
    reads goes into ``findings`` as typed objects (dataclasses), never as dict keys.
    """

    modified: bool
    details: dict[str, Any] = field(default_factory=dict)
    findings: list[Any] = field(default_factory=list)


@dataclass
class PassContext:
    """What a running pass may use: calibration statistics, held-out data, the report."""

    engine: CalibrationEngine | None
    holdout: CalibrationData | None
    report: Report
    record: PassRecord | None = None
    log: Callable[[str], None] = logger.info
    show_progress: bool = True
    # The scheme a later pass asked earlier passes to optimize for (`Pass.optimizes_for`).
    target: Scheme | None = None

    def statistics(self, model: ir.Model, tensors: Sequence[str], xtx: Iterable[str] = (),
                   channels_first: Iterable[str] = ()) -> dict[str, TensorStats]:
        """Statistics of ``tensors`` on the calibration part of the data (cached; channels on axis 1 for ``channels_first``)."""
        stats = self._engine().collect(model, tensors, xtx, channels_first)
        if self.record is not None:
            self.record.statistics.extend(t for t in tensors if t not in self.record.statistics)
        return stats

    def samples(self, model: ir.Model, tensors: Sequence[str], rows: int = 512) -> dict[str, np.ndarray]:
        """Token rows of ``tensors`` from the calibration part of the data (for searches).

        Fewer rows than asked means the search scores on less data than it was tuned for:
        that is said on the console and in the report, with the count.
        """
        found = self._engine().samples(model, tensors, rows)
        fewest = min((len(array) for array in found.values()), default=rows)
        if fewest < rows:
            name = self.record.name if self.record else "a pass"
            self.warn(f"{name}'s search scored on {fewest} calibration rows (tokens), fewer than the {rows} it "
                      "takes; more calibration data makes its choices more reliable")
        return found

    def examples(self, model: ir.Model, tensors: Sequence[str], count: int) -> dict[str, np.ndarray]:
        """The whole ``tensors`` of the first ``count`` calibration samples (searches over convolutions, whose
        error depends on neighbouring pixels, score on these instead of token rows)."""
        return self._engine().examples(model, tensors, count)

    def progress(self, label: str, total: int) -> ContextManager[Callable[..., None]]:
        """A bar or periodic log lines over ``total`` steps of a long loop (`qcompiler.progress`)."""
        return progress(label, total, self.show_progress)

    def warn(self, message: str) -> None:
        """Tell the user now (the console or the caller's log) and keep it in the report's notes."""
        self.log(f"warning: {message}")
        self.report.notes.append(message)

    def batches(self) -> list[dict[str, np.ndarray]]:
        """The calibration part's input batches (never the held-out ones), for searches that run the model."""
        return self._engine().data.batches

    def memory_budget(self) -> int:
        """Bytes the calibration engine may hold in exposed activations, and in ``X^T X`` statistics at once."""
        return self._engine().memory_budget

    def _engine(self) -> CalibrationEngine:
        if self.engine is None:
            name = self.record.name if self.record else "this pass"
            raise QCompilerError(f"Pass '{name}' needs calibration data; give some with --calib (calib= in Python).")
        return self.engine


class Pass(abc.ABC):
    """Base class of every pass. Subclasses set the class attributes and `run`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    preserves_function: ClassVar[bool] = True

    def __init__(self, options: Any | None = None, **kwargs: Any) -> None:
        if options is None:
            options = self.Options(**kwargs)
        elif kwargs:
            options = dataclasses.replace(options, **kwargs)
        self.options = options

    def statistics(self, model: ir.Model) -> list[str]:
        """Names of activation tensors whose calibration statistics the pass needs."""
        return []

    def optimizes_for(self) -> Scheme | None:
        """The scheme earlier passes' searches should score against when this pass follows them (None: no wish)."""
        return None

    @abc.abstractmethod
    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        """Rewrite ``model`` in place."""

    def spec(self) -> str:
        """The pass written back as a pipeline element with every option resolved."""
        fields = dataclasses.fields(self.options)
        if not fields:
            return self.name
        values = ",".join(f"{f.name}={format_option_value(getattr(self.options, f.name))}" for f in fields)
        return f"{self.name}({values})"

    def __repr__(self) -> str:
        return f"<pass {self.spec()}>"


def format_option_value(value: Any) -> str:
    """An option's value as a pipeline string writes it (``true``, ``a;b``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ";".join(str(v) for v in value)
    return str(value)

