"""Declaring the options of a pass or backend: a dataclass field with its default and what it means.

``qcompile passes`` prints each option's meaning beside its default, so the meaning lives
where the option is declared, not in a table that drifts from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any, help: str) -> Any:
    """A dataclass field for an option: ``default`` and ``help`` (one sentence: what it does, what it costs)."""
    return dataclasses.field(default=default, metadata={"help": help})


def option_help(item: dataclasses.Field) -> str:
    """What an option means, as `option` declared it ("" for a plain field)."""
    return item.metadata.get("help", "")
