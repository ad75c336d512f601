"""What ``qcompile passes [NAME]`` prints: the passes, presets and backends, each option once with its meaning.

Every quantization preset is a pass (the quantize pass with that preset as its default),
so listing passes naively repeats the same two dozen quantize options for each preset;
here the presets get one table of what they set, and the quantize options one table.
Meanings come from each option's declaration (`qcompiler.options.option`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import types
import typing
from typing import Any

from rich.table import Table

from qcompiler.backend import BACKENDS, backend_names
from qcompiler.errors import QCompilerError
from qcompiler.options import option_help
from qcompiler.pass_api import format_option_value
from qcompiler.quant.presets import PRESETS as QUANT_PRESETS
from qcompiler.registry import PASSES, PRESET_SUMMARIES, PRESETS, ensure_loaded

QUANTIZE = "quantize"


def catalog(name: str | None = None) -> list[Any]:
    """The tables for everything (``name`` None) or for one pass, preset or backend."""
    ensure_loaded()
    if name is None:
        tables = [_pass_table(), _quant_preset_table(), _pipeline_preset_table(), _backend_table()]
        for pass_name in sorted(PASSES):
            if pass_name not in QUANT_PRESETS:
                tables += _options(pass_name, PASSES[pass_name].Options)
        for backend in backend_names():
            tables += _options(f"--backend {backend}", BACKENDS[backend].Options)
        return tables
    if name in QUANT_PRESETS:
        scheme, summary = QUANT_PRESETS[name]
        return [f"[bold]{name}[/]: the quantize pass with preset={name}: {scheme.describe()} ({summary})",
                *_options(name, PASSES[name].Options)]
    if name in PASSES:
        cls = PASSES[name]
        return [f"[bold]{name}[/] ({_kind(cls)}): {cls.summary}", *_options(name, cls.Options)]
    if name in PRESETS:
        return [f"[bold]{name}[/] = {PRESETS[name]}: {PRESET_SUMMARIES[name]}"]
    if name in BACKENDS:
        return [f"[bold]--backend {name}[/]: {BACKENDS[name].summary}", *_options(f"--backend {name}",
                                                                                  BACKENDS[name].Options)]
    known = [*PASSES, *PRESETS, *BACKENDS]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else " 'qcompile passes' lists them all."
    raise QCompilerError(f"'{name}' is not a pass, preset or backend.{hint}")


def _kind(cls) -> str:
    if isinstance(cls.preserves_function, property):  # it depends on the options: say what the defaults do
        return ("function-preserving" if cls().preserves_function else "changes the function") + " by default"
    return "function-preserving" if cls.preserves_function else "changes the function"


def _pass_table() -> Table:
    table = Table(title="passes", title_justify="left")
    for header in ("pass", "kind", "what it does"):
        table.add_column(header, no_wrap=header != "what it does")
    for name in sorted(PASSES):
        if name not in QUANT_PRESETS:
            table.add_row(name, _kind(PASSES[name]), PASSES[name].summary)
    return table


def _quant_preset_table() -> Table:
    table = Table(title="quantization presets: each is a pass, the quantize pass with preset=NAME and the same "
                        "options", title_justify="left")
    for header in ("preset", "weights", "activations", "what it is"):
        table.add_column(header, no_wrap=header == "preset")
    for name, (scheme, summary) in QUANT_PRESETS.items():
        activation = scheme.activation.describe() if scheme.activation else "float"
        table.add_row(name, scheme.weight.describe(), activation, summary)
    return table


def _pipeline_preset_table() -> Table:
    table = Table(title="pipeline presets", title_justify="left")
    for header in ("preset", "pipeline", "what it is"):
        table.add_column(header, overflow="fold")
    for name in sorted(PRESETS):
        table.add_row(name, PRESETS[name], PRESET_SUMMARIES[name])
    return table


def _backend_table() -> Table:
    table = Table(title="backends (--backend)", title_justify="left")
    for header in ("backend", "what it is"):
        table.add_column(header, no_wrap=header == "backend")
    for name in backend_names():
        table.add_row(name, BACKENDS[name].summary)
    return table


def _options(owner: str, options: type) -> list[Table]:
    """One table of ``owner``'s options (none when it takes none)."""
    fields = dataclasses.fields(options)
    if not fields:
        return []
    table = Table(title=f"{owner} options", title_justify="left")
    for header in ("option", "values", "default", "meaning"):
        table.add_column(header, no_wrap=header in ("option", "default"))
    parents = {f.name: f for base in options.__mro__[1:] if dataclasses.is_dataclass(base)
               for f in dataclasses.fields(base)}
    hints = typing.get_type_hints(options)
    for item in fields:
        meaning = option_help(item) or option_help(parents.get(item.name, item))
        default = "auto" if item.default is None else format_option_value(item.default) or '""'
        table.add_row(item.name, _values(hints[item.name]), default, meaning)
    return [table]


def _values(hint: Any) -> str:
    """An option's type as a user writes it: ``rtn|mse|gptq``, ``int``, ``globs``, ``BxS list``."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return "|".join(map(str, args))
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return _values(args[0])  # an optional option: None means "auto"
    if typing.get_origin(hint) is tuple:
        return "globs"
    if typing.get_origin(hint) in (collections.abc.Sequence, list):
        return "BxS list"
    return getattr(hint, "__name__", str(hint))
