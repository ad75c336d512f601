"""Residual-stream rotation (QuaRot) and LayerNorm -> RMSNorm (SliceGPT) on every architecture.

The tiny models start with gamma = 1 and beta = 0, which would hide a missing fold;
tests that need the fold give every norm its own random gamma (and beta) first.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.analysis.linears import constant_array
from qcompiler.analysis.residual import CENTER, ROTATE, find_streams
from qcompiler.calibration.engine import CalibrationEngine
from qcompiler.graph import add_initializer
from qcompiler.inspection import inspection_dict
from qcompiler.pass_manager import PassManager
from qcompiler.pipeline import parse_pipeline
from qcompiler.testing import zoo_calibration
from qcompiler.verify import worst

TOLERANCE = 1e-4
PRE_NORM = ["llama", "qwen2", "gpt2", "opt", "vit"]
# writers (embedding tables, patch conv, constants, o_proj/down_proj/fc2), norm readers; 2 layers each.
EXPECTED_STREAMS = {
    "llama": ({"embedding": 1, "linear": 4}, 5),
    "qwen2": ({"embedding": 1, "linear": 4}, 5),
    "gpt2": ({"embedding": 2, "linear": 4}, 5),
    "opt": ({"embedding": 2, "linear": 4}, 5),
    "vit": ({"conv": 1, "constant": 2, "linear": 4}, 5),
}
NORM_OPS = ("LayerNormalization", "RMSNormalization")


def run(model: ir.Model, pipeline: str) -> list:
    report = PassManager(parse_pipeline(pipeline), calibration=zoo_calibration(model), tolerance=TOLERANCE,
                         progress=False).run(model)
    for record in report.passes:
        if record.verification:
            assert worst(record.verification)[1]["relative_error"] < TOLERANCE, record.name
    return report.passes


def randomize_norms(model: ir.Model, seed: int = 0) -> None:
    """Give every norm its own random gamma (and beta for LayerNorm), as a trained model has."""
    rng = np.random.default_rng(seed)
    graph = model.graph
    for node in [n for n in graph if n.op_type in NORM_OPS]:
        n = int(node.inputs[1].shape[0])
        node.replace_input_with(1, add_initializer(graph, "gamma", rng.uniform(0.5, 2.0, n).astype(np.float32)))
        if node.op_type == "LayerNormalization":
            node.replace_input_with(2, add_initializer(graph, "beta", rng.normal(0, 0.2, n).astype(np.float32)))


def hadamards(model: ir.Model) -> int:
    return sum(node.op_type == "Hadamard" for node in model.graph)


@pytest.mark.parametrize("arch", PRE_NORM)
def test_pre_norm_stream_is_found_with_its_writers_and_readers(normalized_files, arch):
    (stream,) = find_streams(ir.load(normalized_files(arch)).graph)
    kinds, readers = EXPECTED_STREAMS[arch]
    found = {}
    for writer in stream.writers:
        found[writer.kind] = found.get(writer.kind, 0) + 1
    assert found == kinds
    assert len(stream.readers) == readers and all(r.is_norm for r in stream.readers)
    assert stream.can(ROTATE), stream.refused
    assert stream.needs_centering == (arch not in ("llama", "qwen2"))


@pytest.mark.parametrize("arch", ["bert", "minilm"])
def test_post_norm_stream_is_refused_as_a_whole(normalized_files, arch):
    streams = find_streams(ir.load(normalized_files(arch)).graph)
    assert len(streams) == 1  # joined through the norms: one stream, refused at once
    assert "post-norm" in streams[0].refused[ROTATE] and "post-norm" in streams[0].refused[CENTER]


@pytest.mark.parametrize("arch", PRE_NORM)
def test_fold_norm_then_rotate_absorbs_the_stream_and_drops_online_hadamards(normalized_files, arch):
    model = ir.load(normalized_files(arch))
    randomize_norms(model)
    fallback = ir.load(normalized_files(arch))
    randomize_norms(fallback)
    (refused,) = run(fallback, "rotate")  # gammas not folded: the stream is refused, norms go online
    (reason,) = [s["reason"] for s in refused.details["residual"].values()]
    assert "fold-norm" in reason

    _, record = run(model, "fold-norm,rotate")
    (stream,) = record.details["residual"].values()
    assert stream["rotated"]
    # ViT's final norm is a graph output, so fold-norm leaves its gamma/beta: Q^T is undone in front of it
    # (one dense MatMul), it stays a LayerNorm, and the pooler behind it is rotated online as before.
    kept = int(arch == "vit")
    assert len(stream["unrotate"]) == kept
    assert sum("residual stream" in a for a in record.details["absorbed"]) == 5 - kept
    if arch in ("gpt2", "opt", "vit"):
        assert len(stream["layernorm_to_rmsnorm"]) == 5 - kept
    # Only the FFN-internal activations (gated product, GELU, ReLU outputs) stay online.
    assert hadamards(model) == 2 + kept < hadamards(fallback) == 7


@pytest.mark.parametrize("arch", PRE_NORM)
def test_rotate_before_smooth_rotates_the_stream(normalized_files, arch):
    model = ir.load(normalized_files(arch))  # gamma = 1, beta = 0 as initialised: nothing to fold
    rotate, _ = run(model, "rotate,smooth")
    (stream,) = rotate.details["residual"].values()
    assert stream["rotated"]
    assert hadamards(model) == 2


@pytest.mark.parametrize("arch", PRE_NORM)
def test_smooth_before_rotate_puts_gamma_back_and_the_stream_falls_back(normalized_files, arch):
    model = ir.load(normalized_files(arch))
    *_, rotate = run(model, "fold-norm,shift,smooth,rotate")
    (stream,) = rotate.details["residual"].values()
    assert not stream["rotated"] and "run fold-norm right before rotate" in stream["reason"]
    assert hadamards(model) == 7


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_layernorm_to_rmsnorm_alone_preserves_function(normalized_files, arch):
    model = ir.load(normalized_files(arch))
    randomize_norms(model, seed=1)
    (record,) = run(model, "fold-norm(rmsnorm=true)")
    assert len(record.details["rmsnorm"]) == 5
    assert not any(n.op_type == "LayerNormalization" for n in model.graph)
    (stream,) = find_streams(model.graph)
    # No norm subtracts a mean any more: the stream is zero-mean by construction, writer by writer.
    assert all(r.kind == "rmsnorm" for r in stream.readers)
    for writer in stream.writers:
        for target in writer.targets:
            array = constant_array(target.node.inputs[target.index]).astype(np.float64)
            assert np.abs(array.mean(axis=target.axis)).max() < 1e-6 * max(1.0, np.abs(array).max())


def test_rotation_spreads_an_outlier_channel_planted_in_the_embedding(normalized_files):
    model = ir.load(normalized_files("llama"))
    (gather,) = [n for n in model.graph if n.op_type == "Gather" and constant_array(n.inputs[0]) is not None
                 and constant_array(n.inputs[0]).ndim == 2]
    table = constant_array(gather.inputs[0]).copy()
    table[:, 7] *= 100.0
    gather.replace_input_with(0, add_initializer(model.graph, "embed_outlier", table))
    (stream,) = find_streams(model.graph)
    reader_input = stream.readers[1].value.name  # the second norm reads embedding + attention output

    def ratio(m: ir.Model) -> float:
        engine = CalibrationEngine(zoo_calibration(m), progress=False)
        return engine.collect(m, [reader_input])[reader_input].channel_outlier_ratio

    before = ratio(model)
    run(model, "fold-norm,rotate")
    after = ratio(model)
    assert before > 20 and after < before / 5, (before, after)


def test_minilm_rotate_falls_back_and_says_why(normalized_files, minilm_calibration):
    model = ir.load(normalized_files("minilm"))
    report = PassManager(parse_pipeline("rotate"), calibration=minilm_calibration, tolerance=TOLERANCE,
                         progress=False).run(model)
    (record,) = report.passes
    assert worst(record.verification)[1]["relative_error"] < TOLERANCE
    (stream,) = record.details["residual"].values()
    assert not stream["rotated"] and "post-norm" in stream["reason"]
    assert len(record.details["absorbed"]) == 6 and len(record.details["online"]) == 19


def test_inspection_lists_the_stream(normalized_files):
    (stream,) = inspection_dict(ir.load(normalized_files("opt")), None)["streams"]
    assert len(stream["writers"]) == 6 and len(stream["readers"]) == 5
    assert stream["rotate"] == "admissible"


def test_quantize_leaves_rotates_unrotate_matmul_float(normalized_files):
    model = ir.load(normalized_files("vit"))  # its final norm feeds a graph output: one Q^T MatMul
    randomize_norms(model)
    *_, quantize = PassManager(parse_pipeline("fold-norm,rotate,w8a8"), calibration=zoo_calibration(model),
                               progress=False).run(model).passes
    (unrotate,) = [n for n in model.graph if "qcompiler.unrotate" in n.metadata_props]
    assert "qcompiler.quant" not in unrotate.metadata_props
    assert unrotate.inputs[1].producer() is None  # its Q^T is still a float initializer, not a DequantizeLinear
    assert any("Q^T compensation" in s for s in quantize.details["skipped"])
    assert quantize.details["layers"]
