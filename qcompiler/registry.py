"""Pass contract, registry of named passes, and presets (named pipelines).

A pass is a small class: a registered ``name``, an ``Options`` dataclass whose fields
are its typed options, whether it preserves the model's function, the statistics it
needs, and ``run(model, ctx)``. Modules under `qcompiler.passes` register themselves
with `@register`; importing `qcompiler.passes` loads them all.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_ir as ir

if TYPE_CHECKING:
    from qcompiler.pass_manager import PassContext


@dataclass
class NoOptions:
    """Options of a pass that takes none."""


@dataclass
class PassOutcome:
    """What a pass reports back: whether it changed the model, and free-form details."""

    modified: bool
    details: dict[str, Any] = field(default_factory=dict)


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

    @abc.abstractmethod
    def run(self, model: ir.Model, ctx: "PassContext") -> PassOutcome:
        """Rewrite ``model`` in place."""

    def spec(self) -> str:
        """The pass written back as a pipeline element with every option resolved."""
        fields = dataclasses.fields(self.options)
        if not fields:
            return self.name
        values = ",".join(f"{f.name}={_format_value(getattr(self.options, f.name))}" for f in fields)
        return f"{self.name}({values})"

    def __repr__(self) -> str:
        return f"<pass {self.spec()}>"


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ";".join(str(v) for v in value)
    return str(value)


PASSES: dict[str, type[Pass]] = {}
PRESETS: dict[str, str] = {}
PRESET_SUMMARIES: dict[str, str] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under its ``name``."""
    if cls.name in PASSES or cls.name in PRESETS:
        raise ValueError(f"pass name '{cls.name}' is registered twice")
    PASSES[cls.name] = cls
    return cls


def register_preset(name: str, pipeline: str, summary: str) -> None:
    """Name a pipeline so it can be used like a pass (presets may nest)."""
    if name in PASSES or name in PRESETS:
        raise ValueError(f"preset name '{name}' is registered twice")
    PRESETS[name] = pipeline
    PRESET_SUMMARIES[name] = summary


def ensure_loaded() -> None:
    """Import the pass modules so that their `@register` decorators have run."""
    import qcompiler.passes  # noqa: F401
