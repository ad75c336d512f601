"""Causal LMs with a KV cache: capture, exact generation, decode = recompute, verification and next-token metrics.

The tiny models have random weights: they prove exactness (token-for-token against
transformers, decoding with the cache against recomputing the sequence), never accuracy.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx_ir as ir
import pytest
import torch
import transformers as T
from click.testing import CliRunner

from qcompiler import compiler, decoding
from qcompiler.analysis.regions import SCALE, find_regions
from qcompiler.backend import make_backend
from qcompiler.calibration.resolve import builtin_sentences
from qcompiler.capture import builtin_model_dir, load
from qcompiler.cli import main
from qcompiler.next_token import perplexity, windows
from qcompiler.runtime import make_session
from qcompiler.testing import zoo_calibration

FAMILIES = ["llama", "qwen2", "gpt2", "opt"]
NEW_TOKENS = 32


def _prompts(vocab: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Two prompts of 7 tokens, the second left-padded to 4 real tokens."""
    ids = np.random.default_rng(1).integers(2, vocab, (2, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 1
    return ids, mask


def _transformers_generate(folder, ids: np.ndarray, mask: np.ndarray, new_tokens: int) -> np.ndarray:
    model = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


def _artifact_session(folder):
    path = folder / "model.onnx"
    manifest = json.loads((folder / "manifest.json").read_text())
    return make_backend(manifest["backend"]).session(folder, manifest, ir.load(path))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, normalized_files):
    """Factory: the artifact of (family, pipeline, backend: ORT by default), built once per module."""
    built = {}

    def get(name: str, passes: str, backend: str = "ort"):
        if (name, passes, backend) not in built:
            source = ir.load(normalized_files(name))
            out = tmp_path_factory.mktemp(f"{name}_{passes.replace(',', '_')}_{backend}")
            compiler.compile(normalized_files(name), passes, calib=zoo_calibration(source), output=out, force=True,
                             backend=backend)
            built[name, passes, backend] = out
        return built[name, passes, backend]

    return get


def test_causal_lms_are_captured_with_the_cache_in_optimum_layout(normalized_files):
    model = ir.load(normalized_files("llama"))
    inputs = {v.name: v for v in model.graph.inputs}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [v.name for v in model.graph.outputs] == ["logits", "present.0.key", "present.0.value", "present.1.key",
                                                    "present.1.value"]
    past = inputs["past_key_values.0.key"].shape
    assert [str(d) for d in past] == ["batch", "2", "past_sequence", "16"]
    assert str(inputs["attention_mask"].shape[1]) == "total_sequence"
    layout = decoding.cache_layout(model)
    assert (layout.layers, layout.kv_heads, layout.head_dim) == (2, 2, 16)
    assert layout.bytes_per_token() == 2 * 2 * 2 * 16 * 4
    # Module paths are the Hugging Face ones, not the export wrapper's.
    assert "model.embed_tokens.weight" in model.graph.initializers
    assert decoding.generation_settings(model)["vocab_size"] == 256


@pytest.mark.parametrize("name", FAMILIES)
def test_fp32_artifact_generates_what_transformers_generates(name, zoo_folder, compiled):
    ids, mask = _prompts()
    session = _artifact_session(compiled(name, "normalize"))
    layout = decoding.cache_layout(ir.load(compiled(name, "normalize") / "model.onnx"))
    ours = decoding.generate(session, layout, ids, mask=mask, max_new_tokens=NEW_TOKENS)
    expected = _transformers_generate(zoo_folder(name), ids, mask, NEW_TOKENS)
    np.testing.assert_array_equal(ours.tokens, expected)
    config = json.loads((compiled(name, "normalize") / "genai_config.json").read_text())
    genai = _genai_generate(compiled(name, "normalize"), ids[:1], NEW_TOKENS)
    # onnxruntime-genai stops at the end-of-sequence token, which transformers' min_new_tokens suppressed.
    assert genai == list(expected[0, :len(genai)])
    assert len(genai) == NEW_TOKENS or genai[-1] == config["model"]["eos_token_id"]


def test_a_sliding_window_decoder_generates_within_its_window(zoo_folder, compiled):
    """Mistral's cache keeps window - 1 past tokens; the export holds up to there, and longer prompts are refused."""
    ids, mask = _prompts()
    folder = compiled("mistral", "normalize")
    model = ir.load(folder / "model.onnx")
    ours = decoding.generate(_artifact_session(folder), decoding.cache_layout(model), ids, mask=mask,
                             max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(ours.tokens, _transformers_generate(zoo_folder("mistral"), ids, mask, NEW_TOKENS))
    from qcompiler.errors import QCompilerError

    with pytest.raises(QCompilerError, match="sliding window of 64"):
        decoding.check_prompt_length(model, 60, 8)


def _genai_generate(folder, ids: np.ndarray, new_tokens: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai's own loop and cache, reading the artifact folder as it is."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def test_quantized_artifacts_generate_in_onnxruntime_genai_as_in_qcompiler(compiled):
    folder = compiled("llama", "smooth,rotate,w4a8")
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2 and config["model"]["type"] == "llama"
    ids, _ = _prompts()
    ours = decoding.generate(_artifact_session(folder), decoding.cache_layout(ir.load(folder / "model.onnx")), ids[:1],
                             max_new_tokens=NEW_TOKENS)
    assert _genai_generate(folder, ids[:1], NEW_TOKENS) == list(ours.tokens[0])


def test_fp32_tvm_library_generates_what_transformers_generates(zoo_folder, compiled):
    """One TVM library for any batch, sequence and past length serves the prompt and every decode step.

    (GPT-2's attention plumbing decodes on TVM in the decode-equals-recompute test below.)
    """
    name = "llama"
    folder = compiled(name, "normalize", "tvm")
    entries = json.loads((folder / "manifest.json").read_text())["tvm"]["entries"]
    assert list(entries) == ["any"] and entries["any"]["inputs"]["past_key_values.0.key"]["shape"][2] == "past_sequence"
    ids, mask = _prompts()
    session, layout = _artifact_session(folder), decoding.cache_layout(ir.load(folder / "model.onnx"))
    ours = decoding.generate(session, layout, ids, mask=mask, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(ours.tokens, _transformers_generate(zoo_folder(name), ids, mask, NEW_TOKENS))
    # The graph never checks the mask against the cache, and TVM would read past the end of a tensor.
    feeds = decoding.complete_feeds(layout, {"input_ids": ids, "attention_mask": mask})
    from qcompiler.errors import QCompilerError

    with pytest.raises(QCompilerError, match="The attention mask covers 9 tokens, but the cache holds 0"):
        session.run(None, {**feeds, "attention_mask": np.ones((2, 9), np.int64)})


@pytest.mark.parametrize("name, passes, backend", [
    ("llama", "smooth,rotate,w4a8", "ort"), ("qwen2", "rotate,w8a8", "ort"), ("gpt2", "smooth,w8a8", "ort"),
    ("opt", "rotate,w4a16", "ort"), ("llama", "smooth,rotate,w4a8", "tvm"), ("opt", "rotate,w4a16", "tvm"),
    ("gpt2", "w8a8-dyn(kv=int4)", "tvm")])
def test_quantized_decoding_with_the_cache_equals_recomputing_the_sequence(name, passes, backend, compiled):
    folder = compiled(name, passes, backend)
    if backend == "tvm":  # the linears run on qcompiler's kernels, the decode steps on their M = 1 variants
        layers = json.loads((folder / "manifest.json").read_text())["layers"]
        on_kernels = [layer for layer, info in layers.items() if info.get("kernel", "").startswith("TVM")]
        assert len(on_kernels) >= len(layers) - 1, layers  # w4a16 keeps lm_head in int8 weight-only: Q/DQ
    model = ir.load(folder / "model.onnx")
    layout = decoding.cache_layout(model)
    session = _artifact_session(folder)
    ids, mask = _prompts()
    steps = 8
    result = decoding.generate(session, layout, ids, mask=mask, max_new_tokens=steps, keep_logits=True)
    full = np.concatenate([ids, result.tokens[:, :-1]], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, steps - 1), np.int64)], axis=1)
    recomputed = session.run(["logits"], decoding.complete_feeds(layout, {"input_ids": full, "attention_mask": full_mask}))[0]
    for step, logits in enumerate(result.logits):
        expected = recomputed[:, ids.shape[1] - 1 + step]
        scale = np.abs(expected).max()
        assert np.abs(logits - expected).max() <= 1e-4 * scale, f"step {step}"


def test_a_transform_of_the_cache_is_verified_through_a_decode_step(normalized_files):
    """Prefill alone never reads the past; the decode step of the verification does."""
    model = ir.load(normalized_files("llama"))
    batches = zoo_calibration(model).batches[:1]
    reference = decoding.prompt_and_step(make_session(model), decoding.cache_layout(model), batches)
    past = next(v for v in model.graph.inputs if v.name == "past_key_values.0.value")
    readers = list(past.uses())
    doubled = ir.node("Mul", [past, ir.Value(name="two", const_value=ir.tensor(np.float32(2.0)))])
    model.graph.register_initializer(doubled.inputs[1])
    for use in readers:
        use.node.replace_input_with(use.idx, doubled.outputs[0])
    model.graph.insert_before(model.graph[0], doubled)
    corrupted = decoding.prompt_and_step(make_session(model), decoding.cache_layout(model), batches)
    np.testing.assert_allclose(corrupted[0]["logits"], reference[0]["logits"], rtol=1e-6)
    assert np.abs(corrupted[0]["logits@decode"] - reference[0]["logits@decode"]).max() > 1e-3
    assert not any(name.startswith("present.") for name in reference[0])


def test_smooth_and_rotate_see_through_the_cache(normalized_files, compiled):
    regions = find_regions(ir.load(normalized_files("llama")).graph)
    attention = regions.of_kind("attention")
    assert len(attention) == 2 and all(r.can(SCALE) for r in attention)
    report = json.loads((compiled("llama", "smooth,rotate,w4a8") / "report.json").read_text())
    smooth = next(p for p in report["passes"] if p["name"] == "smooth")
    assert not smooth["details"]["skipped"] and sum("attention" in s for s in smooth["details"]["smoothed"]) == 2
    assert sorted(smooth["verification"]) == ["logits", "logits@decode"]


def test_compile_reports_next_token_metrics_for_causal_lms(compiled):
    manifest = json.loads((compiled("llama", "smooth,rotate,w4a8") / "manifest.json").read_text())
    fidelity = manifest["fidelity"]
    assert fidelity["embedding"] is None
    metrics = fidelity["next_token"]
    assert 0.5 < metrics["top1_agreement"] <= 1 and 0 <= metrics["mean_kl"] < 0.05
    assert metrics["perplexity"] == pytest.approx(metrics["reference_perplexity"], rel=0.05)


def test_sampling_is_seeded_and_stops_at_the_end_of_sequence(compiled):
    folder = compiled("llama", "normalize")
    layout = decoding.cache_layout(ir.load(folder / "model.onnx"))
    session = _artifact_session(folder)
    ids, mask = _prompts()
    runs = [decoding.generate(session, layout, ids, mask=mask, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=s)
            for s in (3, 3, 4)]
    np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
    assert not np.array_equal(runs[0].tokens, runs[2].tokens)
    greedy = decoding.generate(session, layout, ids[:1], max_new_tokens=12)
    stop = int(greedy.tokens[0, 3])
    stopped = decoding.generate(session, layout, ids[:1], max_new_tokens=12, eos_token_id=stop)
    assert stopped.tokens.shape[1] == 1 + list(greedy.tokens[0]).index(stop)


# --------------------------------------------------------------------------- a tiny LM with a real tokenizer


@pytest.fixture(scope="module")
def lm_with_tokenizer(tmp_path_factory):
    """A tiny random Llama using MiniLM's WordPiece tokenizer (its vocabulary size), captured once."""
    folder = tmp_path_factory.mktemp("llama_tokenizer")
    minilm = builtin_model_dir("minilm")
    for file in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / file).is_file():
            shutil.copy(minilm / file, folder / file)
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                           bos_token_id=101, eos_token_id=102, architectures=["LlamaForCausalLM"])
    T.LlamaForCausalLM(config).save_pretrained(folder)
    source = folder / "source.onnx"  # captured once: it records the tokenizer folder for the CLI
    ir.save(load(folder), source)
    calib = folder / "calib.txt"
    calib.write_text("\n".join(builtin_sentences("calibration")[:16]), encoding="utf-8")
    out = tmp_path_factory.mktemp("llama_tokenizer_w8a8")
    compiler.compile(str(source), "w8a8", calib=calib, output=out, backend="ort", batch_size=4)
    return folder, source, out


def test_generate_command_streams_text_and_reports_speed(lm_with_tokenizer):
    """Text in, text streamed out, then the speed of the prompt and of the decode steps."""
    _, _, artifact = lm_with_tokenizer
    result = CliRunner().invoke(main, ["generate", str(artifact), "--prompt", "the weather today is",
                                       "--max-new-tokens", "5"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("the weather today is")
    assert "tokens/s" in result.output and "decode" in result.output
    ids = CliRunner().invoke(main, ["generate", str(artifact), "--prompt-ids", "101,2023,2003", "--max-new-tokens",
                                    "3"], catch_exceptions=False)
    assert ids.exit_code == 0, ids.output


def test_run_fills_the_cache_of_a_prompt(lm_with_tokenizer, tmp_path):
    _, _, artifact = lm_with_tokenizer
    prompt = tmp_path / "prompt.npz"
    np.savez(prompt, input_ids=np.array([[101, 2023, 2003, 102]]))
    result = CliRunner().invoke(main, ["run", str(artifact), "--inputs", str(prompt)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "logits: shape [1, 4, 30522]" in result.output and "present.0.key: shape [1, 1, 4, 16]" in result.output


def test_bench_decode_times_the_prompt_and_the_steps_of_source_and_artifact(lm_with_tokenizer):
    _, _, artifact = lm_with_tokenizer
    result = CliRunner().invoke(main, ["bench", str(artifact), "--decode", "--prompt-length", "8", "--new-tokens", "4",
                                       "--runs", "3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "batch 1, prompt 8 tokens, 4 new tokens" in result.output
    rows = [line for line in result.output.splitlines() if "tokens/s" in line]
    assert [row.split()[0] for row in rows] == ["fp32", "compiled"] and "decode ratio to fp32 1.000" in rows[0]


def test_perplexity_of_the_source_equals_transformers_loss(lm_with_tokenizer, heldout_sentences, tmp_path):
    folder, source, artifact = lm_with_tokenizer
    text = tmp_path / "text.txt"
    text.write_text(" ".join(heldout_sentences), encoding="utf-8")
    tokenizer = T.AutoTokenizer.from_pretrained(folder)
    ids = np.asarray(tokenizer(text.read_text())["input_ids"])
    hf = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    window, stride = 64, 32
    nll = count = 0.0
    with torch.no_grad():  # transformers' strided recipe, by hand
        for begin, end, scored in windows(len(ids), window, stride):
            labels = torch.from_numpy(ids[begin:end][None]).clone()
            labels[:, :-scored] = -100
            loss = hf(torch.from_numpy(ids[begin:end][None]), labels=labels).loss
            tokens = int((labels[:, 1:] != -100).sum())
            nll, count = nll + float(loss) * tokens, count + tokens
    captured = ir.load(source)
    ours = perplexity(make_session(captured), decoding.cache_layout(captured), ids, window=window, stride=stride)
    assert ours.tokens == count
    assert ours.value == pytest.approx(np.exp(nll / count), rel=1e-4)

    result = CliRunner().invoke(main, ["eval", str(source), str(artifact), "--perplexity", str(text), "--window",
                                       str(window), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    measured = json.loads(result.output)["perplexity"]
    assert measured["reference"] == pytest.approx(ours.value, rel=1e-4) and measured["stride"] == 32
    assert measured["compiled"] == pytest.approx(measured["reference"], rel=0.1)


@pytest.mark.parametrize("args, message", [
    (["generate", "{encoder_artifact}", "--prompt-ids", "1,2"], "needs a causal language model with a KV cache"),
    (["generate", "{artifact}", "--prompt-ids", ",".join(["5"] * 126)], "beyond the model's 128 positions"),
    (["generate", "{artifact}", "--prompt-ids", "1,x"], "comma-separated token ids"),
    (["generate", "{artifact}", "--prompt-ids", "40000"], "outside the model's vocabulary of 30522"),
    (["generate", "{artifact}"], "exactly one of --prompt"),
    (["eval", "{folder}", "{artifact}", "--perplexity", "{short}"], "fewer than one window"),
    (["eval", "{folder}", "{artifact}", "--perplexity", "{short}", "--window", "200"], "beyond the model's 128"),
])
def test_bad_decoding_requests_are_one_sentence_exit_2(lm_with_tokenizer, compiled, tmp_path, args, message):
    _, source, artifact = lm_with_tokenizer
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    values = {"artifact": artifact, "folder": source, "short": short,
              "encoder_artifact": compiled("bert", "normalize")}
    result = CliRunner().invoke(main, [a.format(**values) for a in args], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("error:") == 1


# --------------------------------------------------------------------------- KV-cache quantization


@pytest.mark.parametrize("name, passes, stored, bytes_per_token", [
    ("llama", "w8a8(kv=int8)", 16, 2 * 2 * 2 * (16 + 3)),          # codes + fp16 scale + uint8 zero per head
    ("qwen2", "w4a8(kv=int4)", 8, 2 * 2 * 2 * (8 + 3)),            # two codes per byte
    ("gpt2", "w4a16(kv=int4,kv_group=8)", 8, 2 * 2 * 4 * (8 + 6)),  # two groups per head
])
def test_a_quantized_cache_is_stored_as_codes_and_decodes_as_it_recomputes(name, passes, stored, bytes_per_token,
                                                                          compiled):
    folder = compiled(name, passes)
    model = ir.load(folder / "model.onnx")
    layout = decoding.cache_layout(model)
    inputs = {v.name: v for v in model.graph.inputs}
    outputs = {v.name: v for v in model.graph.outputs}
    for tensor in ("past_key_values.1.value", "present.1.value"):
        value = inputs.get(tensor) or outputs[tensor]
        assert value.dtype == ir.DataType.UINT8 and value.shape[3] == stored
    assert inputs["past_key_values.0.key_scale"].dtype == ir.DataType.FLOAT16
    assert layout.quantized and layout.bytes_per_token() == bytes_per_token
    report = json.loads((folder / "report.json").read_text())
    quantize = report["passes"][-1]["details"]
    assert quantize["kv_bytes_per_token"] == bytes_per_token
    assert not (folder / "genai_config.json").exists()  # onnxruntime-genai cannot feed a quantized cache

    session = _artifact_session(folder)
    ids, mask = _prompts()
    result = decoding.generate(session, layout, ids, mask=mask, max_new_tokens=6, keep_logits=True)
    full = np.concatenate([ids, result.tokens[:, :-1]], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, 5), np.int64)], axis=1)
    recomputed = session.run(["logits"], decoding.complete_feeds(layout, {"input_ids": full, "attention_mask": full_mask}))[0]
    for step, logits in enumerate(result.logits):
        expected = recomputed[:, ids.shape[1] - 1 + step]
        assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max(), f"step {step}"
    # The codes hold the float cache of the same pipeline without kv=: within half a step, one at a group's
    # extreme, which the rounded zero point can push past the grid's end.
    float_model = ir.load(compiled(name, passes.split("(")[0]) / "model.onnx")
    float_cache = make_session(float_model).run(["present.0.value"], decoding.complete_feeds(
        decoding.cache_layout(float_model), {"input_ids": ids, "attention_mask": mask}))[0]
    codes, scales, zeros = session.run(["present.0.value", "present.0.value_scale", "present.0.value_zero"],
                                       decoding.complete_feeds(layout, {"input_ids": ids, "attention_mask": mask}))
    if stored * 2 == float_cache.shape[-1]:
        codes = np.stack([codes % 16, codes // 16], axis=-1).reshape(*codes.shape[:3], -1)
    groups = scales.shape[-1]
    restored = ((codes.reshape(*codes.shape[:3], groups, -1).astype(np.float32) - zeros[..., None])
                * scales[..., None].astype(np.float32)).reshape(float_cache.shape)
    step = np.repeat(scales.astype(np.float32), float_cache.shape[-1] // groups, axis=-1)
    error = np.abs(restored - float_cache)
    assert np.all(error <= step * 1.01 + 1e-6) and np.mean(error <= step / 2 * 1.01 + 1e-6) > 0.95


@pytest.mark.parametrize("spec, message", [
    ("w8a8(kv=fp8)", "ONNX's Concat"),
    ("w8a8(kv=int3)", "kv must be one of int8, int4"),
    ("w8a8(kv=int4,kv_group=5)", "must divide the head size 16"),
    ("w8a8(kv_group=8)", "without kv="),
])
def test_unstorable_cache_formats_are_one_sentence(spec, message, normalized_files):
    from qcompiler.errors import QCompilerError

    model = ir.load(normalized_files("llama"))
    with pytest.raises(QCompilerError, match=message):
        compiler.compile(model, spec, calib=zoo_calibration(model), normalize=False)


def test_kv_on_minilm_rounds_its_keys_and_values_and_rotation_helps_int4(normalized_files, minilm_calibration,
                                                                        tokenizer, heldout_sentences):
    """The real-weights check: MiniLM has no cache, but its attention reads the same K and V a cache holds."""
    from qcompiler.calibration import data as calib_data
    from qcompiler.evaluation import evaluate

    source = ir.load(normalized_files("minilm"))
    heldout = calib_data.from_sentences(heldout_sentences, tokenizer, ["input_ids", "attention_mask",
                                                                       "token_type_ids"], 8).batches

    def cosine(passes: str) -> float:
        result = compiler.compile(ir.load(normalized_files("minilm")), passes, calib=minilm_calibration,
                                  normalize=False, verify=False)
        return evaluate(source, result.model, heldout).embedding["mean_cosine"]

    weights_only = cosine("w8a16")
    assert abs(cosine("w8a16(kv=int8)") - weights_only) < 2e-4   # 8-bit K and V cost nothing measurable
    plain_int4 = cosine("w8a16(kv=int4,kv_rotate=false)")
    assert plain_int4 < weights_only - 1e-3                       # 4-bit does
    assert cosine("rotate,w8a16(kv=int4)") > plain_int4 + 1e-4    # values rotated per head, keys by online Hadamard
