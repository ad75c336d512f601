"""The files onnxruntime-genai needs beside a causal LM's model.onnx: ``genai_config.json`` and the tokenizer.

onnxruntime-genai (package ``onnxruntime-genai``) loads a folder holding the decoder graph,
a ``genai_config.json`` naming its inputs and outputs and the cache geometry, and the
Hugging Face tokenizer files, then generates with its own loop and cache management. The
graph qcompiler captures already has the names and the ``[batch, kv_heads, past,
head_dim]`` layout it expects, so an ORT artifact of a causal LM is an onnxruntime-genai
model folder as written.

``type`` selects onnxruntime-genai's model class: its decoder-only class serves every
family whose graph has the inputs above, so families it names differently (or not at all,
as GPT-2, whose ``gpt2`` class expects a fused cache, and OPT) are written as ``llama``, the
plain decoder-only class.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from qcompiler.capture import TOKENIZER_KEY
from qcompiler.decoding import LOGITS, MASK, POSITIONS, TOKENS, cache_layout, generation_settings

CONFIG = "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json")
# onnxruntime-genai's plain decoder-only model types (the others have their own graph conventions).
DECODER_ONLY_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "granite", "olmo",
                      "nemotron"}


def genai_config(model: ir.Model, filename: str = "model.onnx") -> dict | None:
    """onnxruntime-genai's configuration of ``model``, or None when it is not a causal LM with a float KV cache."""
    layout = cache_layout(model)
    if layout is None or layout.quantized:  # onnxruntime-genai allocates a float cache of its own
        return None
    settings = generation_settings(model)
    eos = settings.get("eos_token_id")
    context = settings.get("max_position_embeddings") or 2048
    inputs = {"input_ids": TOKENS, "past_key_names": "past_key_values.%d.key",
              "past_value_names": "past_key_values.%d.value"}
    if layout.has_mask:
        inputs["attention_mask"] = MASK
    if layout.has_positions:
        inputs["position_ids"] = POSITIONS
    model_type = settings.get("model_type")
    heads = settings.get("num_attention_heads") or layout.kv_heads
    return {
        "model": {
            "type": model_type if model_type in DECODER_ONLY_TYPES else "llama",
            "bos_token_id": settings.get("bos_token_id") if settings.get("bos_token_id") is not None else 0,
            # onnxruntime-genai requires one; a source without any gets token 0, where its generation stops too.
            "eos_token_id": eos if eos is not None else 0,
            "pad_token_id": settings.get("pad_token_id") if settings.get("pad_token_id") is not None else 0,
            "vocab_size": settings.get("vocab_size"),
            "context_length": context,
            "decoder": {
                "filename": filename,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": layout.head_dim,
                "hidden_size": settings.get("hidden_size") or heads * layout.head_dim,
                "num_attention_heads": heads,
                "num_key_value_heads": layout.kv_heads,
                "num_hidden_layers": layout.layers,
                "inputs": inputs,
                "outputs": {"logits": LOGITS, "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "temperature": 1.0, "top_k": 1,
                   "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "early_stopping": True},
    }


def genai_files(model: ir.Model) -> dict[str, Callable[[Path], None]]:
    """Writers of ``genai_config.json`` and of the source's tokenizer files (none for other models)."""
    config = genai_config(model)
    if config is None:
        return {}
    files: dict[str, Callable[[Path], None]] = {
        CONFIG: lambda path: path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")}
    folder = model.metadata_props.get(TOKENIZER_KEY)
    if folder:
        for name in TOKENIZER_FILES:
            source = Path(folder) / name
            if source.is_file():
                files[name] = lambda path, source=source: shutil.copyfile(source, path)
    return files
