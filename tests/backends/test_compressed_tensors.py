"""compressed-tensors checkpoints: transformers loads what qcompile wrote, and it computes what was compiled."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from qcompiler.cli import main
from qcompiler.decoding import cache_layout, complete_feeds
from qcompiler.runtime import make_session


def compile_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def llama_calibration(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("calib") / "ids.npz"
    np.savez(path, input_ids=rng.integers(0, 256, (16, 24)).astype(np.int64),
             attention_mask=np.ones((16, 24), np.int64))
    return path


def test_a_tiny_llama_round_trips_through_transformers(zoo_folder, llama_calibration, tmp_path):
    """Offline transforms and 4-bit groups: transformers' CPU load gives the logits of the simulate model."""
    out = tmp_path / "ct"
    result = compile_cli(zoo_folder("llama"), "--passes", "smooth,rotate(mode=offline),w4a16(group_size=32,head=same)",
                         "--calib", llama_calibration, "--format", "compressed-tensors", "-o", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    [group] = config["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 32
    assert not group["weights"]["symmetric"] and len(group["targets"]) == 15  # 2 x 7 linears + lm_head

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    ids = np.random.default_rng(7).integers(0, 256, (2, 11)).astype(np.int64)  # not the calibration data
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    with torch.no_grad():
        got = loaded(input_ids=torch.from_numpy(ids)).logits.numpy()
    import onnx_ir as ir

    simulate = ir.load(out / "model.onnx")
    expected = make_session(simulate).run(["logits"], complete_feeds(cache_layout(simulate), feeds))[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    # The float model differs: the checkpoint really holds the rounded weights.
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(zoo_folder("llama"), dtype=torch.float32)
    with torch.no_grad():
        assert np.abs(fp32(input_ids=torch.from_numpy(ids)).logits.numpy() - got).max() > 1e-3


def test_mixed_precision_is_checked_layer_by_layer_and_says_how_to_load_it(zoo_folder, llama_calibration, tmp_path):
    """The default head=8bit gives two groups: each layer decompresses to the compiled weight with its own scheme."""
    out = tmp_path / "ct"
    result = compile_cli(zoo_folder("llama"), "--passes", "w8a8-dyn(override=*down_proj:w4a8)", "--calib",
                         llama_calibration, "--format", "compressed-tensors", "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    groups = manifest["compressed_tensors"]["config_groups"]
    assert len(groups) == 2
    assert {g["input_activations"]["strategy"] for g in groups.values()} == {"token"}
    assert any("every layer decompresses to the compiled weights" in note for note in manifest["notes"])
    assert any("2 quantization groups" in note for note in manifest["notes"])


@pytest.mark.parametrize("source, passes, message", [
    ("llama", "rotate,w4a16(group_size=32)", "rotates 2 activation(s) online"),
    ("llama", "nvfp4", "takes integer and FP8 weights so far"),
    ("llama", "w8a8(kv=int8)", "KV cache"),
    ("onnx", "w8a8", "captured from a Hugging Face folder"),
    ("bert", "smooth,w8a16", "elementwise compensation(s)"),  # post-norm: the residual reads the scaled LayerNorm
])
def test_what_the_format_cannot_hold_is_one_sentence_and_nothing_written(zoo_folder, minilm_files, llama_calibration,
                                                                       tmp_path, source, passes, message):
    out = tmp_path / "ct"
    model = minilm_files["legacy"] if source == "onnx" else zoo_folder(source)
    calib = [] if source == "onnx" else ["--calib", llama_calibration]
    result = compile_cli(model, "--passes", passes, *calib, "--format", "compressed-tensors", "-o", out)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize("preset, checkpoint_format", [("w8a8(head=same)", "int-quantized"),
                                                       ("fp8(head=same)", "float-quantized")])
def test_static_activations_carry_the_compiled_scales(zoo_folder, llama_calibration, tmp_path, preset,
                                                      checkpoint_format):
    """transformers' load runs activations in float, so input_scale is checked against the graph here."""
    import onnx_ir as ir
    from safetensors.torch import load_file

    from qcompiler.quant.annotation import annotated_layers

    out = tmp_path / "ct"
    result = compile_cli(zoo_folder("llama"), "--passes", preset, "--calib", llama_calibration, "--format",
                         "compressed-tensors", "-o", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    [group] = config["config_groups"].values()
    assert group["format"] == checkpoint_format and not group["input_activations"]["dynamic"]
    tensors = load_file(out / "model.safetensors")
    simulate = ir.load(out / "model.onnx")
    checked = 0
    for node, annotation in annotated_layers(simulate):
        dequantize = node.inputs[0].producer()
        if preset.startswith("w8a8"):  # DequantizeLinear(QuantizeLinear(x, scale, zero))
            scale = dequantize.inputs[0].producer().inputs[1].const_value.numpy()
        else:  # the float8 form: Mul(Cast(Cast(Div(x, scale))), scale)
            scale = next(v.const_value.numpy() for v in dequantize.inputs if v.const_value is not None)
        written = tensors[f"{annotation.layer}.input_scale"].float().numpy()
        assert np.allclose(written.reshape(-1), scale.reshape(-1), rtol=1e-6)
        checked += 1
    assert checked == 15
