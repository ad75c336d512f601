"""Parse pipeline strings such as ``smooth(alpha=0.6),rotate,w4a8`` into pass objects.

Options are typed by each pass's ``Options`` dataclass: ``int``, ``float``, ``bool``
(true/false/1/0/yes/no), ``str``, ``Literal[...]`` choices, optionals, and
``tuple[str, ...]`` lists written with ``;`` between items. Every mistake is reported
in one sentence that names the pass and option, with close names as suggestions.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Iterable, Sequence, Union

from qcompiler.errors import PipelineError
from qcompiler.pass_api import Pass
from qcompiler.registry import PASSES, PRESETS, ensure_loaded


def parse_pipeline(pipeline: str | Sequence[Pass | str] | None) -> list[Pass]:
    """Turn a pipeline string (or a list of pass objects and strings) into pass objects."""
    ensure_loaded()
    if pipeline is None:
        return []
    if isinstance(pipeline, str):
        return _parse_string(pipeline, seen_presets=())
    passes: list[Pass] = []
    for item in pipeline:
        if isinstance(item, Pass):
            passes.append(item)
        elif isinstance(item, str):
            passes.extend(_parse_string(item, seen_presets=()))
        else:
            raise PipelineError(f"A pipeline element must be a pass object or a string, not a {type(item).__name__}.")
    return passes


def _parse_string(text: str, seen_presets: tuple[str, ...]) -> list[Pass]:
    passes: list[Pass] = []
    for element in split_top_level(text, ","):
        element = element.strip()
        if not element:
            continue
        name, raw_options = _split_call(element)
        if name in PRESETS:
            if raw_options:
                raise PipelineError(f"Preset '{name}' takes no options; write its passes out to set options.")
            if name in seen_presets:
                raise PipelineError(f"Preset '{name}' refers to itself.")
            passes.extend(_parse_string(PRESETS[name], seen_presets + (name,)))
            continue
        if name not in PASSES:
            raise PipelineError(
                f"Unknown pass '{name}'{_suggest(name, list(PASSES) + list(PRESETS))}; "
                "run 'qcompile passes' to list them."
            )
        cls = PASSES[name]
        passes.append(cls(build_options(cls, raw_options)))
    return passes


def split_top_level(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside parentheses."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"Unbalanced ')' in pipeline '{text}'.")
        if char == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise PipelineError(f"Unbalanced '(' in pipeline '{text}'.")
    parts.append("".join(current))
    return parts


def _split_call(element: str) -> tuple[str, dict[str, str]]:
    if "(" not in element:
        return element, {}
    if not element.endswith(")"):
        raise PipelineError(f"Pipeline element '{element}' has text after its closing ')'.")
    name, body = element.split("(", 1)
    options: dict[str, str] = {}
    for item in split_top_level(body[:-1], ","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise PipelineError(f"Option '{item}' of pass '{name.strip()}' must be written as key=value.")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key in options:
            raise PipelineError(f"Option '{key}' is given twice for pass '{name.strip()}'.")
        options[key] = value.strip()
    return name.strip(), options


def build_options(cls: type[Pass], raw: dict[str, str]) -> Any:
    """Build the pass's options dataclass from raw strings, converting each by its type."""
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    hints = typing.get_type_hints(cls.Options)
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in fields:
            known = ", ".join(fields) if fields else "none"
            raise PipelineError(
                f"Pass '{cls.name}' has no option '{key}'{_suggest(key, list(fields))}; its options are: {known}."
            )
        values[key] = convert_option(cls.name, key, text, hints[key])
    try:
        return cls.Options(**values)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"Bad options for pass '{cls.name}': {exc}") from exc


def convert_option(pass_name: str, key: str, text: str, hint: Any) -> Any:
    """Convert one option string to the type named by ``hint``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert_option(pass_name, key, text, arg)
            except PipelineError as exc:
                errors.append(str(exc))
        raise PipelineError(errors[0] if errors else f"Option '{key}' of pass '{pass_name}' cannot be '{text}'.")
    if origin is typing.Literal:
        if text in args:
            return text
        raise PipelineError(
            f"Option '{key}' of pass '{pass_name}' must be one of {', '.join(map(str, args))}, not '{text}'."
        )
    if origin is tuple:
        return tuple(convert_option(pass_name, key, item, args[0]) for item in text.split(";") if item)
    if hint is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise PipelineError(f"Option '{key}' of pass '{pass_name}' must be true or false, not '{text}'.")
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise PipelineError(
                f"Option '{key}' of pass '{pass_name}' must be {'an integer' if hint is int else 'a number'}, not '{text}'."
            ) from None
    if hint is str:
        return text
    raise PipelineError(f"Option '{key}' of pass '{pass_name}' has an unsupported type {hint}.")


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def format_pipeline(passes: Sequence[Pass]) -> str:
    """The resolved pipeline string, every option written out."""
    return ",".join(p.spec() for p in passes)
