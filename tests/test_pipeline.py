"""Pipeline strings: typed options, presets, Python objects, one-sentence errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from qcompiler.errors import PipelineError
from qcompiler.pipeline import build_options, format_pipeline, parse_pipeline, split_top_level
from qcompiler.pass_api import Pass, PassOutcome
from qcompiler.registry import PASSES


@dataclass
class _Options:
    alpha: float = 0.5
    steps: int = 3
    search: bool = False
    kind: Literal["hadamard", "random"] = "hadamard"
    skip: tuple[str, ...] = ()
    seed: int | None = None


class _Example(Pass):
    name = "example"
    summary = "test pass"
    Options = _Options

    def run(self, model, ctx):
        return PassOutcome(False)


def test_options_are_converted_by_type():
    opts = build_options(_Example, {"alpha": "0.6", "steps": "4", "search": "true", "kind": "random",
                                    "skip": "*embeddings*;*lm_head*", "seed": "none"})
    assert opts == _Options(alpha=0.6, steps=4, search=True, kind="random", skip=("*embeddings*", "*lm_head*"), seed=None)
    assert build_options(_Example, {"seed": "7"}).seed == 7


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"alhpa": "1"}, "has no option 'alhpa' \\(did you mean 'alpha'\\?\\)"),
        ({"steps": "many"}, "must be an integer, not 'many'"),
        ({"alpha": "x"}, "must be a number, not 'x'"),
        ({"search": "maybe"}, "must be true or false"),
        ({"kind": "walsh"}, "must be one of hadamard, random, not 'walsh'"),
    ],
)
def test_bad_options_are_one_sentence(raw, message):
    with pytest.raises(PipelineError, match=message) as info:
        build_options(_Example, raw)
    assert "\n" not in str(info.value)


def test_presets_expand_and_round_trip():
    passes = parse_pipeline("normalize")
    assert [p.name for p in passes] == ["convert-opset", "simplify", "fuse-norms", "fuse-gelu", "canonical-linear", "simplify"]
    assert format_pipeline(passes).startswith("convert-opset(version=23),simplify")
    assert [p.name for p in parse_pipeline(format_pipeline(passes))] == [p.name for p in passes]


def test_pipeline_from_python_objects_and_strings():
    convert = PASSES["convert-opset"](version=21)
    passes = parse_pipeline([convert, "simplify"])
    assert passes[0] is convert and passes[1].name == "simplify"
    assert passes[0].spec() == "convert-opset(version=21)"


@pytest.mark.parametrize(
    "text, message",
    [
        ("simplyfy", "Unknown pass 'simplyfy' \\(did you mean 'simplify'\\?\\)"),
        ("convert-opset(version=23", "Unbalanced '\\('"),
        ("convert-opset(23)", "must be written as key=value"),
        ("normalize(x=1)", "Preset 'normalize' takes no options"),
        ("convert-opset(version=1,version=2)", "given twice"),
    ],
)
def test_bad_pipelines(text, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)


def test_split_top_level_respects_parentheses():
    assert split_top_level("a(x=1,y=2),b,c(z=3)", ",") == ["a(x=1,y=2)", "b", "c(z=3)"]
