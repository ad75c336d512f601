"""affine: learned Kronecker transforms preserve the function and lower the quantized error they are fit to.

The pass manager verifies each pass on held-out batches (relative output error 1e-4), so a
run that returns is the numerical check of ``x T T^-1 W = x W``; the tests also check what
the fit learned against where it started.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from qcompiler.quant.affine_fit import fake_quant, fit_affine
from qcompiler.quant.presets import PRESETS
from qcompiler.quant.spec import QuantSpec, fake_quant as numpy_fake_quant
from qcompiler.hadamard import orthogonal_matrix
from qcompiler.testing import zoo_calibration
from qcompiler.pass_manager import PassManager
from qcompiler.pipeline import parse_pipeline
from qcompiler.verify import worst
from tests.passes.test_transforms import TOLERANCE, run

FAST = "affine(steps=3,rows=64)"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt", "bert", "vit"])
def test_affine_preserves_function_on_tiny_architectures(normalized_files, arch):
    model = ir.load(normalized_files(arch))
    (record,) = run(model, FAST, zoo_calibration(model))
    assert record.modified and record.details["transformed"], record.details
    hadamards = [n for n in model.graph if n.op_type == "Hadamard"]
    assert len(hadamards) == len(record.details["transformed"])
    assert 0 < record.details["online_macs_share"] < 1


def test_affine_after_rotate_refines_the_online_hadamards_in_place(normalized_files):
    model = ir.load(normalized_files("llama"))
    rotate, affine = run(model, f"rotate,{FAST}", zoo_calibration(model))
    refined = [name for name, entry in affine.details["transformed"].items() if entry["refined"]]
    assert len(refined) == len(rotate.details["online"]) >= 2
    assert sum(n.op_type == "Hadamard" for n in model.graph) == len(affine.details["transformed"])


def test_minilm_affine_learns_below_its_hadamard_start(normalized_files, minilm_calibration_48):
    model = ir.load(normalized_files("minilm"))
    report = PassManager(parse_pipeline("affine(steps=4,rows=128),w4a4"), calibration=minilm_calibration_48,
                         tolerance=TOLERANCE, progress=False).run(model)
    affine = report.passes[0]
    assert worst(affine.verification)[1]["relative_error"] < TOLERANCE  # w4a4's own error is not checked here
    transformed = affine.details["transformed"]
    assert len(transformed) == 25  # per layer the LayerNorm output (q, k, v), context (o), fc1, GELU output (fc2);
    # and the pooler's dense
    assert affine.details["target"] == PRESETS["w4a4"][0].describe()
    assert all(e["loss"]["learned"] < e["loss"]["start"] < e["loss"]["none"] for e in transformed.values())
    assert sum(e["scale"] for e in transformed.values()) >= 6  # the LayerNorm regions absorb the scale


@pytest.fixture(scope="module")
def minilm_calibration_48(tokenizer):
    from qcompiler.calibration import data as calib_data
    from qcompiler.calibration.resolve import builtin_sentences

    return calib_data.from_sentences(builtin_sentences("calibration")[:48], tokenizer,
                                     ["input_ids", "attention_mask", "token_type_ids"], batch_size=8)


@pytest.mark.parametrize("spec, role, shape", [
    (QuantSpec("int4", "channel"), "weight", (64, 24)),
    (QuantSpec("uint4", "group", 32, symmetric=False), "weight", (64, 24)),
    (QuantSpec("int8", "token", dynamic=True), "activation", (10, 64)),
    (QuantSpec("int8", "tensor", symmetric=False), "activation", (10, 64)),
    (QuantSpec("fp8-e4m3", "channel"), "weight", (64, 24)),
])
def test_torch_fake_quant_matches_the_deployed_arithmetic(spec, role, shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3
    ours = fake_quant(torch.from_numpy(x), spec, role).numpy()
    np.testing.assert_allclose(ours, numpy_fake_quant(x, spec, role), rtol=1e-5, atol=1e-5)


def test_fit_lowers_the_error_on_outlier_channels():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 48)).astype(np.float32)
    x[:, [3, 17]] *= 40  # two outlier channels, as LayerNorm outputs have
    weight = rng.standard_normal((48, 32)).astype(np.float32)
    scheme = PRESETS["w4a4"][0]
    fit = fit_affine(x, [weight], scheme, orthogonal_matrix(6), orthogonal_matrix(8), True, 30, 5e-3)
    assert fit.loss < fit.start_loss < fit.identity_loss
    assert fit.scale is not None and fit.scale.shape == (48,)
