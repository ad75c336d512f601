"""The quantize pass and its presets on the tiny architectures and on the real MiniLM."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.analysis.convolutions import find_convolutions
from qcompiler.analysis.linears import find_linears
from qcompiler.backends.ort.backend import saturation_free_layout
from qcompiler.backends.ort.lower import lower
from qcompiler.calibration import data as calib_data
from qcompiler.errors import PipelineError, QCompilerError
from qcompiler.evaluation import evaluate
from qcompiler.pass_api import Pass, PassOutcome
from qcompiler.pass_manager import PassManager
from qcompiler.pipeline import parse_pipeline
from qcompiler.quant.annotation import annotated_layers
from qcompiler.quant.presets import PRESETS
from qcompiler.quant.sensitivity import SensitivityRow
from qcompiler.report import Report
from qcompiler.runtime import make_session, run_batches
from qcompiler.summary import summary_lines
from qcompiler.testing import zoo_calibration
from qcompiler.verify import compare_outputs

ARCHITECTURES = ["llama", "qwen2", "gpt2", "opt", "bert", "vit"]
EIGHT_BIT = {"w8a8", "w8a8-dyn", "w8a16", "fp8", "mxfp8"}


def quantize(model: ir.Model, pipeline: str, calibration):
    report = PassManager(parse_pipeline(pipeline), calibration=calibration, progress=False).run(model)
    return report.passes[-1]


def cosine(record) -> float:
    return min(v["cosine"] for v in record.verification.values())


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_preset_quantizes_every_linear_of_every_architecture(normalized_files, arch, preset):
    model = ir.load(normalized_files(arch))
    linears = len(find_linears(model.graph))
    convs = find_convolutions(model.graph)  # ViT's patch embedding
    activation = PRESETS[preset][0].activation
    group = activation.group_size if activation is not None and activation.granularity == "group" else 1
    expected = linears + sum(conv.in_channels % group == 0 for conv in convs)
    record = quantize(model, preset, zoo_calibration(model))
    annotated = [n for n in model.graph if "qcompiler.quant" in n.metadata_props]
    assert len(annotated) == expected == len(record.details["layers"])
    # Weights are DequantizeLinear outputs, or (formats onnxruntime cannot dequantize) annotated float grids.
    assert all("qcompiler.quant" in linear.matmul.metadata_props for linear in find_linears(model.graph))
    # Tiny random models claim nothing about accuracy; 8-bit must still track the float model closely.
    assert cosine(record) > (0.99 if preset in EIGHT_BIT else 0.0)
    assert all(np.isfinite(v["max_abs_error"]) for v in record.verification.values())


def test_native_formats_store_integer_codes(normalized_files):
    model = ir.load(normalized_files("llama"))
    before = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    record = quantize(model, "w4a16", zoo_calibration(model))
    dequantize = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dequantize) == len(record.details["layers"])
    # head=8bit (the default) keeps the LM head at 8-bit weights; every other linear stores 4-bit codes.
    assert record.details["kept_8bit"] == ["lm_head (w8a16)"]
    codes = collections.Counter(n.inputs[0].const_value.dtype for n in dequantize)
    assert codes == {ir.DataType.UINT4: len(dequantize) - 1, ir.DataType.INT8: 1}
    dequantize = [n for n in dequantize if n.inputs[0].const_value.dtype == ir.DataType.UINT4]
    assert all(n.attributes["block_size"].value == 128 or n.inputs[0].shape[0] < 128 for n in dequantize)
    after = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    assert after < before  # float weights were removed, not kept beside the codes


@pytest.mark.parametrize("pipeline, head_preset", [("w4a16(head=same)", "w4a16"),
                                                   ("w4a16(override=lm_head:w8a8-dyn)", "w8a8-dyn"),
                                                   ("w8a8", "w8a8")])
def test_the_head_follows_head_same_an_override_or_an_8bit_preset(normalized_files, pipeline, head_preset):
    model = ir.load(normalized_files("llama"))
    record = quantize(model, pipeline, zoo_calibration(model))
    layers = {layer["linear"]: layer["preset"] for layer in record.details["layers"]}
    assert layers["lm_head"] == head_preset and record.details["kept_8bit"] == []


def test_skip_and_override_by_module_path(normalized_files, minilm_calibration):
    model = ir.load(normalized_files("minilm"))
    record = quantize(model, "w4a8(skip=pooler*,override=*output.dense:w8a8;*.query:w8a16)",
                      minilm_calibration)
    layers = {layer["linear"]: layer for layer in record.details["layers"]}
    assert record.details["skipped"] == ["pooler.dense"] and "pooler.dense" not in layers
    assert layers["encoder.layer.2.output.dense"]["preset"] == "w8a8"
    assert layers["encoder.layer.2.attention.output.dense"]["preset"] == "w8a8"
    assert layers["encoder.layer.0.attention.self.query"]["activation"] == "float"
    assert layers["encoder.layer.0.intermediate.dense"]["preset"] == "w4a8"
    annotation = next(a for _, a in annotated_layers(model) if a.preset == "w8a8")
    assert annotation.activation.range is not None and annotation.weight.native
    assert annotation.activation.source is not None


def test_fallback_fills_its_share_by_output_damage_per_parameter(normalized_files, minilm_calibration):
    record = quantize(ir.load(normalized_files("minilm")), "w4a16(fallback=0.2,override=*.query:w8a8)",
                      minilm_calibration)
    ranking = record.findings
    assert ranking and all(isinstance(row, SensitivityRow) for row in ranking)
    density = [row.rtn_output_error / row.parameters for row in ranking]
    assert density == sorted(density, reverse=True) and density[-1] > 0
    budget, spent, expected = 0.2 * sum(row.parameters for row in ranking), 0, []
    for row in ranking:  # greedy: every linear that still fits, in ranking order
        fits = spent + row.parameters <= budget
        spent += row.parameters if fits else 0
        expected.append("w8a16" if fits else "w4a16")
    assert [row.preset for row in ranking] == expected and expected[0] == "w8a16"
    # The user's override is kept and not ranked; everything else is.
    layers = {layer["linear"]: layer for layer in record.details["layers"]}
    assert not any(row.linear.endswith(".query") for row in ranking)
    assert len(ranking) == len(layers) - 6 and layers["encoder.layer.0.attention.self.query"]["preset"] == "w8a8"
    for row in ranking:
        assert layers[row.linear]["preset"] == row.preset


def test_fallback_ranking_picks_the_linears_worth_the_bytes(normalized_files, minilm_calibration):
    chosen = quantize(ir.load(normalized_files("minilm")), "w4a16(fallback=0.1)", minilm_calibration)
    ranking = chosen.findings
    bought = sum(row.parameters for row in ranking if row.preset == "w8a16")
    least, spent = [], 0
    for row in reversed(ranking):  # at least as many parameters, from the other end of the ranking
        if spent >= bought:
            break
        least.append(f"{row.linear}:w8a16")
        spent += row.parameters
    spent_on_the_least = quantize(ir.load(normalized_files("minilm")), f"w4a16(override={';'.join(least)})",
                                  minilm_calibration)
    plain = quantize(ir.load(normalized_files("minilm")), "w4a16", minilm_calibration)
    # As many 8-bit weights either way; only the measured ranking makes them pay.
    assert cosine(chosen) > cosine(spent_on_the_least) + 0.005
    assert cosine(chosen) - cosine(plain) > 4 * (cosine(spent_on_the_least) - cosine(plain))


def test_static_int8_fallback_moves_the_linears_whose_ranges_hurt_most_to_dynamic(normalized_files,
                                                                                  minilm_calibration):
    """w8a8(fallback=...) ranks by the damage of each linear's static input range alone, measured."""
    chosen = quantize(ir.load(normalized_files("minilm")), "w8a8(fallback=0.25)", minilm_calibration)
    ranking = chosen.findings
    density = [row.rtn_output_error / row.parameters for row in ranking]
    assert density == sorted(density, reverse=True) and density[-1] > 0
    moved = [row for row in ranking if row.preset == "w8a8-dyn"]
    assert moved and sum(r.parameters for r in moved) <= 0.25 * sum(r.parameters for r in ranking)
    layers = {layer["linear"]: layer["preset"] for layer in chosen.details["layers"]}
    assert all(layers[row.linear] == row.preset for row in ranking)
    least = ";".join(f"{row.linear}:w8a8-dyn" for row in ranking[-len(moved):])
    spent_on_the_least = quantize(ir.load(normalized_files("minilm")), f"w8a8(override={least})", minilm_calibration)
    plain = quantize(ir.load(normalized_files("minilm")), "w8a8", minilm_calibration)
    assert cosine(chosen) > cosine(plain) + 0.001 and cosine(chosen) > cosine(spent_on_the_least) + 0.001


def test_minilm_fidelity_and_what_helps(normalized_files, minilm_calibration):
    def run(pipeline):
        return cosine(quantize(ir.load(normalized_files("minilm")), pipeline, minilm_calibration))

    assert run("w8a8") > 0.98
    assert run("rotate,w8a8") > 0.995
    # 24 calibration sentences pin down a 1536-wide Hessian poorly: GPTQ needs more damping than the paper's 1%.
    assert run("w4a16(weights=gptq,damp=0.1)") > run("w4a16") + 0.003
    assert run("rotate,w4a4") > run("w4a4") + 0.05


def test_low_rank_compensation_takes_back_rounding_error_on_minilm(normalized_files, minilm_calibration):
    """EoRA fits the correction to the calibration outputs: on MiniLM's outliers it beats LoRC's plain SVD by far."""
    def run(pipeline):
        model = ir.load(normalized_files("minilm"))
        return model, quantize(model, pipeline, minilm_calibration)

    _, plain = run("w4a16")
    model, eora = run("w4a16(eora=8,lowrank_dtype=int8)")
    _, lorc = run("w4a16(lorc=8)")
    assert cosine(eora) > cosine(lorc) > cosine(plain)
    assert cosine(eora) > cosine(plain) + 0.01
    layers = eora.details["layers"]
    assert all(layer["lowrank"]["rank"] == 8 and layer["lowrank"]["weight_sqnr_db"] > layer["weight_sqnr_db"]
               for layer in layers)
    branch = [n for n in model.graph if "qcompiler.lowrank" in n.metadata_props]
    assert len(branch) == 2 * len(layers)
    # The report's bytes are the factors the artifact stores: int8 codes and a float32 scale per column.
    stored = sum(v.const_value.nbytes for name, v in model.graph.initializers.items() if "_lowrank_" in name)
    assert eora.details["lowrank"] == {"method": "eora", "storage": "int8", "layers": len(layers), "bytes": stored}
    assert eora.details["coverage"]["MatMul"]["float_reasons"]["low-rank compensation branch (float by design)"] \
        == len(branch)
    assert f"w4a16: low-rank compensation (eora, int8) beside {len(layers)} linears" \
        in summary_lines(Report("minilm", "w4a16(eora=8)", [eora]))[1]


def test_the_outlier_split_takes_minilms_outlier_channels_out_of_int8(normalized_files, minilm_calibration, tokenizer,
                                                                       heldout_sentences):
    """LLM.int8()'s threshold of 6 leaves a handful of MiniLM's channels in float and most of the static error goes."""
    heldout = calib_data.from_sentences(heldout_sentences, tokenizer, list(minilm_calibration.batches[0])).batches
    reference = ir.load(normalized_files("minilm"))
    plain, plain_record = quantize_minilm(normalized_files, "w8a8", minilm_calibration)
    model, split = quantize_minilm(normalized_files, "w8a8(outliers=6)", minilm_calibration)
    # Real tokens only (as everywhere): padding positions, never read downstream, see ranges calibration never bounded.
    before, after = (evaluate(reference, m, heldout).embedding["mean_cosine"] for m in (plain, model))
    assert after > before + 0.002 and after > 0.998
    # The pass manager's verification counts real tokens too (with padding it read 0.967 against 0.988).
    assert cosine(split) > cosine(plain_record) + 0.002
    report = split.details["outliers"]
    assert report["threshold"] == 6.0 and report["inputs"]
    assert 0 < report["float_share"] < 0.02  # a few channels out of 384 and 1536
    for entry in report["inputs"].values():
        assert 0 < len(entry["float_channels"]) < entry["of"]
    rows = [v for name, v in model.graph.initializers.items() if name.endswith("_outlier_rows")]
    assert report["float_bytes"] == sum(v.const_value.nbytes for v in rows) > 0
    # The int8 side sees the other channels only: the rows O of every split linear's weight are zero codes.
    split_layers = [layer for layer in split.details["layers"] if "float_channels" in layer]
    assert len(split_layers) == len(rows)
    assert split.details["coverage"]["MatMul"]["float_reasons"]["outlier channels of outliers= (float by design)"] \
        == len(rows)
    channels = sum(len(entry["float_channels"]) for entry in report["inputs"].values())
    line = f"w8a8: outlier split (outliers=6): {channels} channels of {len(report['inputs'])} linear inputs run in float"
    assert any(text.startswith(line) for text in summary_lines(Report("minilm", "w8a8(outliers=6)", [split])))


# Static on every architecture (its quantizer drops the mask); per token, which keeps it, on two.
@pytest.mark.parametrize("arch, preset", [(arch, "w8a8") for arch in ARCHITECTURES]
                         + [("llama", "w8a8-dyn"), ("bert", "w8a8-dyn")])
def test_the_outlier_split_runs_on_every_architecture_on_onnxruntimes_kernels(normalized_files, arch, preset):
    """A threshold of 3 splits the random models' normed inputs (channel maxima 1.8 to 3.9 there).

    The simulate form tracks the float model as 8-bit does, and onnxruntime's kernels match it.
    """
    model = ir.load(normalized_files(arch))
    calibration = zoo_calibration(model)
    record = quantize(model, f"{preset}(outliers=3)", calibration)
    assert record.details["outliers"]["inputs"] and record.details["outliers"]["float_share"] > 0
    assert cosine(record) > 0.99
    simulated = run_batches(make_session(model), calibration.batches)
    lower(model, saturation_free_layout())
    deployed = run_batches(make_session(model, fuse_qdq=True), calibration.batches)
    assert min(e["cosine"] for e in compare_outputs(simulated, deployed).values()) > 0.999


def quantize_minilm(normalized_files, pipeline: str, calibration):
    model = ir.load(normalized_files("minilm"))
    return model, quantize(model, pipeline, calibration)


@pytest.mark.parametrize("pipeline, message", [
    ("w8a8(outliers=-1)", "magnitude threshold"),
    ("w4a16(outliers=6)", "keeps activations float"),
    ("w4a16(lorc=4,eora=4)", "choose one"),
    ("w4a16(eora=-1)", "ranks of the low-rank correction"),
    ("w4a8(override=*dense)", "glob:preset"),
    ("w4a8(override=*dense:w9a9)", "unknown quantization preset"),
    ("w8a8(observer=median)", "must be one of"),
    ("quantize(preset=int3)", "unknown quantization preset"),
    ("w4a16(group_size=-4)", "group_size"),
    ("w4a16(weights=gptq,scales=absmax)", "must be one of"),
    ("w4a16(weights=gptq,refine=-1)", "0 or more"),
    ("w4a16(weights=rtn,refine=2)", "tune GPTQ"),
    ("w4a16(weights=awq,scales=mse)", "tune GPTQ"),
    ("w4a16(fallback=-0.1)", "share of weight parameters"),
    ("w4a16(fallback=2)", "share of weight parameters"),
    ("w4a16(fallback=0.2,fallback_preset=w9)", "unknown quantization preset"),
    ("w8a8-dyn(fallback=0.2)", "has neither"),
    ("w8a16(fallback=0.2)", "has neither"),
])
def test_bad_options_are_one_sentence(pipeline, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(pipeline)


def test_gptq_scale_search_and_refine_change_the_stored_weights_and_raise_fidelity(normalized_files, minilm_calibration):
    """``scales=mse`` and ``refine`` on MiniLM's first layer: the searched scales are what the graph stores,
    and the output on the pass manager's held-out part gets closer to FP32 (deterministic: 0.99632 -> 0.99656)."""
    def quantized(pipeline):
        model = ir.load(normalized_files("minilm"))
        record = quantize(model, pipeline, minilm_calibration)
        return model, record

    base = "w4a16(weights=gptq,act_order=true,damp=0.1,skip=*layer.[1-5].*;pooler*"
    plain, plain_record = quantized(base + ",scales=minmax,refine=0)")
    tuned, record = quantized(base + ",scales=mse,refine=2)")
    assert {layer["linear"] for layer in record.details["layers"]} == {
        f"encoder.layer.0.{name}" for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                                               "attention.output.dense", "intermediate.dense", "output.dense")}

    def dequantize_linear_inputs(model):
        return {n.name: [v.const_value.numpy() for v in n.inputs[1:]] for n in model.graph
                if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None}

    plain_dq, tuned_dq = dequantize_linear_inputs(plain), dequantize_linear_inputs(tuned)
    assert plain_dq.keys() == tuned_dq.keys() and len(plain_dq) == 6
    assert all(not np.array_equal(plain_dq[n][0], tuned_dq[n][0]) for n in plain_dq)  # searched scales
    assert cosine(record) > cosine(plain_record)


def test_searches_score_against_the_pipeline_target(normalized_files):
    seen = []

    class Spy(Pass):
        """Records the target each run sees, as smooth's and shift's searches would use it."""

        name, summary = "spy", "records ctx.target"

        def run(self, model, ctx):
            seen.append(ctx.target)
            return PassOutcome(False)

    class Wish(Pass):
        """A later pass with its own wish, which earlier passes see until the next wish."""

        name, summary = "wish", "asks for w8a8"

        def optimizes_for(self):
            return parse_pipeline("w8a8")[0].scheme()

        def run(self, model, ctx):
            return PassOutcome(False)

    passes = [Spy(), *parse_pipeline("w4a16(group_size=32)"), Spy(), Wish(), Spy()]
    PassManager(passes, verify=False, progress=False).run(ir.load(normalized_files("minilm")))
    assert [t.describe() if t else None for t in seen] == [
        "W uint4 g32 asym / A float", "W int8 channel sym / A int8 tensor asym", None]


TRANSPOSED_CONV_ONLY = """
<ir_version: 10, opset_import: ["" : 23]>
decoder (float[1, 3, 16, 16] image) => (float[1, 8, 33, 33] features) {
    up = ConvTranspose <strides: ints = [2, 2]> (image, kernel)
    features = Relu(up)
}
"""


def test_a_preset_that_finds_nothing_to_quantize_refuses(tmp_path):
    """Regression: w8a8 on a CNN quantized nothing and still reported success (outputs identical to FP32)."""
    from click.testing import CliRunner

    from qcompiler.cli import main
    from qcompiler.testing import model_from_text

    model = model_from_text(TRANSPOSED_CONV_ONLY, {"kernel": np.ones((3, 8, 3, 3), np.float32)})
    with pytest.raises(QCompilerError, match="found no layer to quantize.*ConvTranspose x1"):
        PassManager(parse_pipeline("w8a8"), verify=False, progress=False).run(model)
    path = tmp_path / "decoder.onnx"
    ir.save(model, path)
    result = CliRunner().invoke(main, [str(path), "--passes", "w4a16", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "found no layer to quantize" in result.output and not (tmp_path / "out").exists()


def test_skipping_every_linear_is_refused_too():
    from qcompiler.testing import model_from_text

    text = """
    <ir_version: 10, opset_import: ["" : 23]>
    g (float[2, 4, 16] x) => (float[2, 4, 16] y) {
        y = MatMul(x, w)
    }
    """
    model = model_from_text(text, {"w": np.eye(16, dtype=np.float32)})
    with pytest.raises(QCompilerError, match="no linear left to quantize: all 1 were skipped"):
        PassManager(parse_pipeline("w4a16(skip=*)"), verify=False, progress=False).run(model)


def test_static_int8_on_a_static_3d_matmul_add_runs_in_onnxruntime(tmp_path):
    """Regression (found by the fuzz suite): onnxruntime turned MatMul + Add of a static [2, 5, 8] input into a Gemm
    and rejected the int8 activation pair it copied for it ('output_dtype INT8 does not match y_zero_point type
    UINT8'), so every w8a8 artifact of such a graph was reported as qcompiler's bug."""
    from qcompiler.calibration.data import from_iterable
    from qcompiler.runtime import make_session
    from qcompiler.testing import model_from_text

    rng = np.random.default_rng(0)
    model = model_from_text("""
        <ir_version: 10, opset_import: ["" : 23]>
        g (float[2, 5, 8] x) => (float[2, 5, 8] y) <float[8, 8] w, float[8] b> {
            h = MatMul (x, w)
            y = Add (h, b)
        }""", {"w": rng.standard_normal((8, 8)).astype(np.float32), "b": rng.standard_normal(8).astype(np.float32)})
    batches = [{"x": rng.standard_normal((2, 5, 8)).astype(np.float32)} for _ in range(4)]
    PassManager(parse_pipeline("w8a8"), calibration=from_iterable(batches), progress=False).run(model)
    zero_points = {n.inputs[2].const_value.dtype for n in model.graph if n.op_type == "QuantizeLinear"}
    assert zero_points == {ir.DataType.UINT8}  # int8's grid as uint8 codes + 128: the same values
    deployed = make_session(model, fuse_qdq=True).run(None, batches[0])[0]
    measured = make_session(model).run(None, batches[0])[0]
    np.testing.assert_allclose(deployed, measured, atol=1e-4 * np.abs(measured).max())


def _quantized_weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: value.const_value.numpy().copy() for name, value in model.graph.initializers.items()
            if value.const_value is not None and value.const_value.dtype != ir.DataType.FLOAT}


def test_gptq_gathers_x_t_x_within_the_memory_budget(normalized_files):
    """All Hessians in one run when they fit; one input per run when the budget holds one (then GPTQ's sequential)."""
    from qcompiler.testing import zoo_calibration

    def compile_with(pipeline: str, budget: int) -> tuple[dict, PassManager]:
        model = ir.load(normalized_files("llama"))
        manager = PassManager(parse_pipeline(pipeline), calibration=zoo_calibration(model), verify=False,
                              memory_budget=budget, progress=False)
        manager.run(model)
        return _quantized_weights(model), manager

    roomy, whole = compile_with("w4a16(weights=gptq)", 2**30)
    tight, chunked = compile_with("w4a16(weights=gptq)", 1)  # no two X^T X fit: one input per run
    sequential, _ = compile_with("w4a16(weights=gptq,sequential=true)", 2**30)
    gathering = lambda manager: [r for r in manager.engine.records if r.tensors and r.cached < r.tensors]  # noqa: E731
    assert len(gathering(chunked)) > len(gathering(whole))
    assert sorted(tight) == sorted(sequential) == sorted(roomy)
    assert all(np.array_equal(tight[name], sequential[name]) for name in tight)
    assert any(not np.array_equal(roomy[name], sequential[name]) for name in roomy)
    held = [s.xtx.nbytes for s in chunked.engine._cache.values() if s.xtx is not None]
    assert len(held) == 1  # the cache keeps the last one only
