"""The compile report: what each pass did, how long it took, and what it cost in error."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

FindingT = TypeVar("FindingT")


@dataclass
class PassRecord:
    name: str
    spec: str
    preserves_function: bool
    seconds: float = 0.0
    modified: bool = False
    nodes_before: int = 0
    nodes_after: int = 0
    nodes_added: int = 0
    nodes_removed: int = 0
    initializers_added: int = 0
    initializers_removed: int = 0
    initializers_changed: int = 0
    verification: dict[str, dict[str, float]] | None = None
    statistics: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    findings: list[Any] = field(default_factory=list)  # typed results other stages read (`PassOutcome.findings`)


@dataclass
class Report:
    source: str
    pipeline: str
    passes: list[PassRecord] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    total_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def findings(self, kind: type[FindingT]) -> list[FindingT]:
        """Every finding of type ``kind`` that the passes handed back, in pipeline order."""
        return [item for record in self.passes for item in record.findings if isinstance(item, kind)]

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n", encoding="utf-8")

    def table(self) -> Table:
        table = Table(title="qcompiler passes", caption=self.pipeline, title_justify="left", caption_justify="left")
        table.add_column("pass", no_wrap=True)
        for header in ("time s", "nodes", "+/-", "inits +/-/~", "rel err", "cosine", "stats"):
            table.add_column(header, justify="right")
        for record in self.passes:
            rel, cos = "-", "-"
            if record.verification:
                rel = f"{max(v['relative_error'] for v in record.verification.values()):.2e}"
                cos = f"{min(v['cosine'] for v in record.verification.values()):.6f}"
            table.add_row(
                record.name,
                f"{record.seconds:.2f}",
                f"{record.nodes_after}",
                f"+{record.nodes_added}/-{record.nodes_removed}",
                f"+{record.initializers_added}/-{record.initializers_removed}/~{record.initializers_changed}",
                rel,
                cos,
                str(len(record.statistics)),
            )
        return table

    def print(self, console: Console | None = None) -> None:
        """The pass table and notes; outside a terminal (a notebook, a log) at 140 columns, not squeezed to 80."""
        console = console or (Console() if sys.stdout.isatty() else Console(width=140))
        console.print(self.table())
        for note in self.notes:
            console.print(f"note: {note}")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
