"""The registry of named passes, and presets (named pipelines).

Passes (`qcompiler.pass_api.Pass`) register under their ``name`` with `@register`;
modules under `qcompiler.passes` do so when imported, and `ensure_loaded` imports them
all. A preset names a pipeline string, so it can be used like a pass.
"""

from __future__ import annotations

from qcompiler.pass_api import Pass

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
