"""The pass manager verifies function-preserving passes and records what every pass did."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.analysis.linears import find_linears
from qcompiler.errors import VerificationError
from qcompiler.pass_manager import PassManager
from qcompiler.pipeline import parse_pipeline
from qcompiler.pass_api import Pass, PassOutcome


class ScaleFirstWeight(Pass):
    """Multiplies the first linear's weight: claims to preserve the function, does not."""

    name = "scale-first-weight"
    summary = "test pass"

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def run(self, model, ctx):
        weight = find_linears(model.graph)[0].weight
        weight.const_value = ir.tensor(weight.const_value.numpy() * np.float32(self.factor))
        return PassOutcome(True, {"factor": self.factor})


class ReadsStatistics(Pass):
    name = "reads-statistics"
    summary = "test pass"

    def statistics(self, model):
        return [find_linears(model.graph)[0].input.name]

    def run(self, model, ctx):
        return PassOutcome(False)


def test_verification_stops_a_pass_that_changes_outputs(minilm, minilm_calibration):
    manager = PassManager(parse_pipeline("normalize") + [ScaleFirstWeight(1.5)], calibration=minilm_calibration,
                          progress=False)
    with pytest.raises(VerificationError, match="Pass 'scale-first-weight' changed output .* above the tolerance"):
        manager.run(minilm)


def test_report_records_changes_errors_and_statistics(minilm, minilm_calibration, tmp_path):
    passes = parse_pipeline("normalize") + [ReadsStatistics(), ScaleFirstWeight(1.0 + 1e-7)]
    report = PassManager(passes, calibration=minilm_calibration, progress=False).run(minilm, "minilm")
    by_name = {r.name: r for r in report.passes}
    gelu = by_name["fuse-gelu"]
    assert gelu.nodes_removed > gelu.nodes_added > 0 and gelu.verification is not None
    assert all(v["cosine"] > 0.99999 for v in gelu.verification.values())
    assert by_name["reads-statistics"].statistics and not by_name["reads-statistics"].modified
    scaled = by_name["scale-first-weight"]
    assert scaled.initializers_changed == 1 and scaled.verification is not None
    assert report.calibration["holdout_batches"] >= 1
    report.write_json(tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["passes"][0]["name"] == "convert-opset" and data["pipeline"].startswith("convert-opset")


def test_without_calibration_the_report_says_unverified(minilm):
    report = PassManager(parse_pipeline("simplify"), progress=False).run(minilm)
    assert any("not verified" in note for note in report.notes)
    assert report.passes[0].verification is None
