"""fold-norm, smooth, shift and rotate preserve the function on every architecture and on MiniLM.

The pass manager verifies each pass on held-out batches and raises above the tolerance
(relative output error 1e-4), so a run that returns is the numerical check; the tests
also assert each pass changed what it claims to.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.analysis.linears import constant_array
from qcompiler.calibration import data as calib_data
from qcompiler.pass_manager import PassManager
from qcompiler.pipeline import parse_pipeline
from qcompiler.testing import zoo_calibration
from qcompiler.verify import worst

ARCHITECTURES = ["llama", "qwen2", "gpt2", "opt", "bert", "vit"]
PIPELINES = ["fold-norm", "smooth", "smooth(search=true,grid=5)", "shift", "shift(scale=true,grid=5)",
             "rotate", "rotate(kind=random,seed=3)", "rotate(mode=online)"]
TOLERANCE = 1e-4


def run(model: ir.Model, pipeline: str, calibration) -> list:
    report = PassManager(parse_pipeline(pipeline), calibration=calibration, tolerance=TOLERANCE,
                         progress=False).run(model)
    for record in report.passes:
        if record.verification:
            assert worst(record.verification)[1]["relative_error"] < TOLERANCE
    return report.passes


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_transform_preserves_function_on_tiny_architectures(normalized_files, arch, pipeline):
    model = ir.load(normalized_files(arch))
    (record,) = run(model, pipeline, zoo_calibration(model))
    # Nothing to do: post-norm BERT has no foldable norm; RMSNorm models have nothing that absorbs a shift.
    idle = (arch == "bert" and pipeline == "fold-norm") or (arch in ("llama", "qwen2") and pipeline.startswith("shift"))
    assert record.modified != idle, record.details


def test_shared_gamma_is_duplicated_not_rewritten_under_other_readers(normalized_files):
    model = ir.load(normalized_files("llama"))
    norms = [n for n in model.graph if n.op_type == "RMSNormalization"]
    shared = norms[0].inputs[1]
    assert all(n.inputs[1] is shared for n in norms), "the exporter de-duplicates the all-ones RMSNorm weights"
    (record,) = run(model, "smooth", zoo_calibration(model))
    duplicated = [note for note in record.details["notes"] if shared.name in note and "duplicated" in note]
    assert len(duplicated) == len(norms) - 1  # the last reader owns the original once the others have copies
    gammas = [n.inputs[1] for n in norms]
    assert len({id(g) for g in gammas}) == len(norms)
    assert all(len(g.uses()) == 1 for g in gammas)
    assert not any(np.array_equal(constant_array(g), np.ones(64, np.float32)) for g in gammas)


@pytest.mark.parametrize("order", ["fold-norm,shift,smooth,rotate", "rotate,smooth,shift", "smooth,rotate,fold-norm,shift"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_any_order_stays_function_preserving(normalized_files, arch, order):
    model = ir.load(normalized_files(arch))
    records = run(model, order, zoo_calibration(model))
    assert [r.name for r in records] == order.split(",")


def online_affine_ops(model: ir.Model) -> list[list[str]]:
    """Per Hadamard node, the ops of the chain of single readers that follows it up to the sinks."""
    chains = []
    for node in (n for n in model.graph if n.op_type == "Hadamard"):
        chain, value = [], node.outputs[0]
        while len(value.uses()) == 1 and (reader := value.uses()[0].node).op_type in ("Mul", "Add"):
            chain.append(reader.op_type)
            value = reader.outputs[0]
        chains.append(chain)
    return chains


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt", "vit"])
def test_scale_and_shift_see_through_online_hadamards(normalized_files, arch):
    model = ir.load(normalized_files(arch))
    rotate, smooth, shift, again, rerotate = run(model, "rotate,smooth,shift(scale=true,grid=5),smooth,rotate",
                                                 zoo_calibration(model))
    online = len(rotate.details["online"])
    assert online >= 2
    for record, listed in ((smooth, "smoothed"), (shift, "shifted"), (again, "smoothed")):
        assert sum("online-rotation" in entry for entry in record.details[listed]) == online, record.name
    # The second smooth rewrote the Mul and Add in place; the second rotate added no Hadamard behind the first
    # ones (its new Hadamards sit in front of the norms, whose gamma smooth put back).
    chains = online_affine_ops(model)
    assert chains.count(["Mul", "Add"]) == online and chains.count([]) == len(rerotate.details["online"])
    assert len(rerotate.details["skipped"]) == online
    assert all("already rotated" in reason for reason in rerotate.details["skipped"].values())


@pytest.fixture(scope="module")
def minilm_calibration_48(tokenizer):
    from qcompiler.calibration.resolve import builtin_sentences

    return calib_data.from_sentences(builtin_sentences("calibration")[:48], tokenizer,
                                     ["input_ids", "attention_mask", "token_type_ids"], batch_size=8)


@pytest.mark.parametrize("pipeline", ["shift,smooth,rotate", "smooth,shift(scale=true,grid=4),rotate",
                                      "smooth(search=true,grid=4)"])
def test_minilm_transforms_preserve_function(normalized_files, minilm_calibration_48, pipeline):
    model = ir.load(normalized_files("minilm"))
    records = run(model, pipeline, minilm_calibration_48)
    assert all(r.modified for r in records)
    rotate = next((r for r in records if r.name == "rotate"), None)
    if rotate is not None:
        assert len(rotate.details["absorbed"]) == 6  # v_proj -> o_proj per head, each layer
        assert len(rotate.details["online"]) == 19  # LayerNorm outputs and GELU outputs: 384 = 32 x 12, 1536 = 128 x 12


def test_rotate_on_the_legacy_export_with_symbolic_dims(minilm_files, minilm_calibration_48):
    """Regression: rotate read int(SymbolicDim) on the legacy exporter's attention context and crashed."""
    model = ir.load(minilm_files["legacy"])
    *_, rotate = run(model, "normalize,rotate", minilm_calibration_48)
    assert len(rotate.details["absorbed"]) == 6 and len(rotate.details["online"]) == 19  # as on the dynamo export


def test_minilm_smooth_after_rotate_searches_the_online_regions(normalized_files, minilm_calibration_48):
    model = ir.load(normalized_files("minilm"))
    rotate, smooth = run(model, "rotate,smooth(search=true,grid=4)", minilm_calibration_48)
    online = [entry.split()[0] + "_rotated" for entry in rotate.details["online"]]
    assert len(online) == 19 and not smooth.details["skipped"]
    assert set(online) <= set(smooth.details["alpha"])
    smoothed = sum("online-rotation" in entry for entry in smooth.details["smoothed"])
    assert smoothed == sum(smooth.details["alpha"][name] is not None for name in online)
    assert online_affine_ops(model).count(["Mul"]) == smoothed


@pytest.mark.parametrize("online, count, width", [("activations", 6, "1536"), ("norms", 13, "384")])
def test_rotate_online_option_picks_the_regions_that_pay_for_a_hadamard(normalized_files, minilm_calibration_48,
                                                                         online, count, width):
    """MiniLM: GELU outputs (before the FFN's second linear) or LayerNorm outputs only; still exact."""
    model = ir.load(normalized_files("minilm"))
    (rotate,) = run(model, f"rotate(online={online})", minilm_calibration_48)
    assert len(rotate.details["online"]) == count and len(rotate.details["absorbed"]) == 6
    assert all(entry.endswith(f"(H_{'128' if width == '1536' else '32'} (Sylvester) x H_12 (Paley I, q=11))")
               for entry in rotate.details["online"])
    assert sum(f"online={online}" in reason for reason in rotate.details["skipped"].values()) == 19 - count
