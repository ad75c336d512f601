"""smooth, shift and rotate each shrink, on MiniLM, the activation outliers they exist to shrink.

The transform tests prove the passes preserve the function, which a pass that did
nothing would too. Here each pass runs on the real model, calibrated on the calibration
sentences, and the statistic it targets is measured on held-out sentences, before and
after, on the inputs of the linears it rewrites:

- smooth and rotate: the channel outlier ratio (max / median of per-channel absmax), the
  spread that makes one per-tensor activation scale coarse for every other channel;
- shift: the per-tensor absmax, the range a symmetric quantizer must cover, which
  centring asymmetric channels shrinks.

Thresholds sit below the figures measured when these tests were written (in comments),
with slack for a change in numerics, not for a pass that stops working.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.analysis.linears import find_linears
from qcompiler.analysis.regions import SCALE, SHIFT, find_regions
from qcompiler.calibration import data as calib_data
from qcompiler.calibration.engine import CalibrationEngine
from qcompiler.calibration.stats import TensorStats
from qcompiler.pass_manager import PassManager
from qcompiler.pipeline import parse_pipeline
from qcompiler.testing import MINILM_INPUTS


@pytest.fixture(scope="module")
def heldout(tokenizer, heldout_sentences) -> CalibrationEngine:
    """Statistics over held-out sentences, none of which the passes calibrate on."""
    data = calib_data.from_sentences(heldout_sentences, tokenizer, list(MINILM_INPUTS), batch_size=8)
    return CalibrationEngine(data, progress=False)


def linear_inputs(model: ir.Model, engine: CalibrationEngine, linears: list[str]) -> dict[str, TensorStats]:
    """Statistics of what each named linear reads, keyed by the linear (rotate changes which tensor that is)."""
    reads = {l.matmul.name: l.input.name for l in find_linears(model.graph) if l.matmul.name in linears}
    assert sorted(reads) == sorted(linears)
    stats = engine.collect(model, list(dict.fromkeys(reads.values())))
    return {name: stats[tensor] for name, tensor in reads.items()}


def before_and_after(model: ir.Model, pipeline: str, calibration, heldout: CalibrationEngine,
                     linears: list[str]) -> tuple[dict[str, TensorStats], dict[str, TensorStats]]:
    """Held-out statistics of the linears' inputs before and after ``pipeline`` (verified as usual)."""
    before = linear_inputs(model, heldout, linears)
    (record,) = PassManager(parse_pipeline(pipeline), calibration=calibration, progress=False).run(model).passes
    assert record.modified
    return before, linear_inputs(model, heldout, linears)


def sinks_of(model: ir.Model, capability: str) -> list[str]:
    """The linears reading a region that can absorb ``capability``: the ones the pass rewrites."""
    return sorted({sink.linear.matmul.name for r in find_regions(model.graph).able(capability) for sink in r.sinks})


def outlier_ratios(stats: dict[str, TensorStats]) -> np.ndarray:
    return np.array([stats[name].channel_outlier_ratio for name in sorted(stats)])


def test_smooth_flattens_the_outlier_channels(normalized_files, minilm_calibration, heldout):
    model = ir.load(normalized_files("minilm"))
    linears = sinks_of(model, SCALE)
    assert len(linears) == 31  # q, k, v, FFN up and o_proj per layer, and the pooler
    before, after = before_and_after(model, "smooth", minilm_calibration, heldout, linears)
    old, new = outlier_ratios(before), outlier_ratios(after)
    # Measured: the worst input went from 20.0 to 6.7 (0.34x); the median input to 0.47x of its ratio.
    assert new.max() < 0.5 * old.max(), (old.max(), new.max())
    assert np.median(new / old) < 0.65, np.round(new / old, 2)


def test_shift_shrinks_the_range_a_symmetric_quantizer_covers(normalized_files, minilm_calibration, heldout):
    model = ir.load(normalized_files("minilm"))
    linears = sinks_of(model, SHIFT)
    assert len(linears) == 25  # the readers of LayerNorm outputs: q, k, v and FFN up per layer, and the pooler
    before, after = before_and_after(model, "shift", minilm_calibration, heldout, linears)
    shrink = np.array([after[n].absmax.max() / before[n].absmax.max() for n in linears])
    # Measured: every input's absmax fell to 0.19x-0.60x of what it was (median 0.54x).
    assert shrink.max() < 0.7, dict(zip(linears, np.round(shrink, 2)))


def test_rotate_spreads_the_outlier_channels(normalized_files, minilm_calibration, heldout):
    model = ir.load(normalized_files("minilm"))
    linears = sorted(l.matmul.name for l in find_linears(model.graph))
    # Every linear is rotated: six v_proj -> o_proj offline, the readers of 19 LayerNorm and GELU outputs online.
    before, after = before_and_after(model, "rotate", minilm_calibration, heldout, linears)
    old, new = outlier_ratios(before), outlier_ratios(after)
    # Measured: the worst input went from 23.6 to 5.9 (0.25x); the median input to 0.24x of its ratio.
    assert new.max() < 0.4 * old.max(), (old.max(), new.max())
    assert np.median(new / old) < 0.4, np.round(new / old, 2)
