"""The recipe search: targets, the trial function, the choice among measured candidates, the written artifact."""

from __future__ import annotations

import json
import pickle
from importlib.resources import files

import numpy as np

import pytest
from click.testing import CliRunner

from qcompiler.artifact import open_artifact
from qcompiler.cli import main
from qcompiler.compiler import compile as run_compile
from qcompiler.distributed import ray_trials
from qcompiler.errors import QCompilerError
from qcompiler.pipeline import parse_pipeline
from qcompiler.recipe_search import TargetNotMet, candidates, refinements, search
from qcompiler.testing import ocr_classifier_path, text_line_images

SPACE = {"transforms": ("", "rotate"), "presets": ("w8a8", "w8a8-dyn"), "refine": False, "runs": 3}


def test_every_candidate_is_a_valid_pipeline():
    pipelines = candidates()
    assert len(pipelines) == 28 and "smooth,rotate,w4a8" in pipelines and "w8a8" in pipelines
    assert "smooth,rotate(online=activations),w8a8" in pipelines
    refined = [r for p in pipelines for r in refinements(p)]
    assert len(refined) == 21 * 4 and not refinements("rotate,w8a8-dyn")  # dynamic int8 has no finer step
    assert "smooth,w8a8(fallback=0.25)" in refined and "rotate,w4a8(weights=gptq)" in refined
    for pipeline in pipelines + refined:
        parse_pipeline(pipeline)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One small search on the real MiniLM (4 candidates) whose trials run as Ray tasks, their specs recorded."""
    seen = []
    out = tmp_path_factory.mktemp("search") / "out"
    with ray_trials() as on_ray:
        def mapper(function, specs):
            seen.extend(pickle.loads(pickle.dumps(spec)) for spec in specs)  # what a Ray task receives
            return on_ray(function, specs)

        return search("minilm", "cos>=0.995", output=out, map_trials=mapper, **SPACE), seen


def test_search_chooses_the_fastest_candidate_meeting_the_target(searched):
    result, seen = searched
    assert [s.pipeline for s in seen] == ["w8a8", "rotate,w8a8", "w8a8-dyn", "rotate,w8a8-dyn"]
    assert all(t.error is None and t.latency_ratio > 0 and 0.9 < t.value <= 1 for t in result.trials)
    meeting = [t for t in result.trials if t.value >= 0.995]
    assert meeting and result.winner is min(meeting, key=lambda t: t.latency_ratio)
    assert result.target.met(result.winner.value) and result.warning() is None  # int8 MiniLM beats FP32
    for trial in result.trials:  # the frontier: exactly the trials no other beats on all three at once
        beaten = any(o.value >= trial.value and o.latency_ratio <= trial.latency_ratio
                     and o.weight_bytes <= trial.weight_bytes and o is not trial
                     and (o.value, o.latency_ratio, o.weight_bytes) != (trial.value, trial.latency_ratio,
                                                                       trial.weight_bytes)
                     for o in result.trials)
        assert (trial in result.frontier) == (not beaten)


def test_a_trials_fidelity_is_the_compilers_own(searched, minilm_calibration):
    """The search scores a candidate exactly as compiling that pipeline alone would."""
    result, _ = searched
    trial = next(t for t in result.trials if t.pipeline == "rotate,w8a8")
    alone = run_compile("minilm", "rotate,w8a8", verify=False).manifest["fidelity"]["embedding"]["mean_cosine"]
    assert trial.value == pytest.approx(alone, abs=1e-6)


def test_the_written_artifact_is_the_winner_with_its_frontier(searched):
    result, _ = searched
    path, manifest = open_artifact(result.output)  # file sizes recorded after the search files were added
    assert manifest["source"] == "minilm" and "sha256" in manifest
    assert manifest["search"]["winner"] == result.winner.pipeline and manifest["search"]["met"]
    record = json.loads((result.output / "search.json").read_text())
    assert record["target"] == "cos>=0.995" and len(record["trials"]) == 4
    assert {"search.json", "search.png"} <= set(manifest["files"])
    report = (result.output / "report.md").read_text()
    assert "## Recipe search: cos>=0.995 on ort" in report and "qcompiler-search-" not in report
    assert "| `" + result.winner.pipeline + "` |" in report


def test_an_unmet_target_writes_nothing_unless_best_effort(tmp_path):
    out, space = tmp_path / "out", {**SPACE, "transforms": ("", "rotate"), "presets": ("w8a8",)}
    with pytest.raises(TargetNotMet, match="No candidate met cos>=0.99999 on ort among 2 tried") as refused:
        search("minilm", "cos>=0.99999", output=out, **space)
    assert not out.exists() and len(refused.value.result.trials) == 2 and refused.value.result.frontier
    result = search("minilm", "cos>=0.99999", output=out, best_effort=True, **space)
    closest = max(result.trials, key=lambda t: t.value)
    assert result.winner is closest and not result.target.met(closest.value)
    assert json.loads((out / "manifest.json").read_text())["search"]["met"] is False


def test_a_miss_faster_than_every_hit_is_refined_layer_by_layer():
    """w8a8 alone misses cos>=0.995 on MiniLM; its refinements move measured linears to dynamic int8."""
    result = search("minilm", "cos>=0.995", transforms=("",), presets=("w8a8",), runs=3)
    assert [t.pipeline for t in result.trials] == ["w8a8", *refinements("w8a8")]
    assert not result.target.met(result.trials[0].value)
    assert result.winner is not None and "fallback=" in result.winner.pipeline
    assert result.winner.value > result.trials[0].value + 0.001


def test_a_spent_budget_leaves_candidates_unexplored():
    with pytest.raises(TargetNotMet, match="among 0 tried, 28 left unexplored by the budget") as refused:
        search("minilm", "cos>=0.99", budget=0.001)
    assert len(refused.value.result.unexplored) == 28


def test_a_cnn_is_searched_by_its_output_cosine_not_by_sentence_embeddings(tmp_path):
    """The real pre-trained OCR classifier: no sentence embedding to score, so cos is refused; out-cos works."""
    images, _ = text_line_images(files("qcompiler").joinpath("data/calibration.txt").read_text().splitlines()[:16])
    calibration = tmp_path / "images.npz"
    np.savez(calibration, x=images)
    space = {**SPACE, "transforms": ("",)}
    with pytest.raises(QCompilerError, match="'cos' .* does not apply to this model: it has no sentence-embedding"):
        search(str(ocr_classifier_path()), "cos>=0.99", calib=str(calibration), **space)
    result = search(str(ocr_classifier_path()), "out-cos>=0.99", calib=str(calibration), **space)
    assert len(result.trials) == 2 and all(0.99 < t.value <= 1 + 1e-6 for t in result.trials)
    assert result.winner in result.trials
    assert (result.warning() is not None) == (result.winner.latency_ratio >= 1)


def test_a_next_token_target_on_an_encoder_is_refused():
    with pytest.raises(QCompilerError,
                       match="'top1' does not apply to a model without a KV cache; use one of cos, min-cos, out-cos"):
        search("minilm", "top1>=0.9")


@pytest.mark.parametrize("args, sentence", [
    (["--search", "cos<=0.9"], "higher when better"),
    (["--search", "cos>=0.99", "--passes", "w8a8"], "give --passes or --search, not both"),
    (["--budget", "20m"], "belong to --search"),
    (["--search", "cos>=0.99", "--budget", "soon"], "not a positive duration"),
    (["--search", "cos>=0.99", "--shape", "1x32,1x128"], "times one shape"),
])
def test_cli_refuses_bad_search_options(tmp_path, args, sentence):
    result = CliRunner().invoke(main, ["minilm", *args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and sentence in result.output
    assert not (tmp_path / "out").exists()


def test_cli_prints_the_frontier_when_the_target_is_not_met(tmp_path):
    result = CliRunner().invoke(main, ["minilm", "--search", "cos>=0.99", "--budget", "0.001", "--shape", "1x128",
                                       "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "recipe search: cos>=0.99 on ort, latency at 1x128" in result.output
    assert "left unexplored by the budget" in result.output and "No candidate met" in result.output
    assert not (tmp_path / "o").exists()
