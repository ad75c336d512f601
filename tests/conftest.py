"""Shared fixtures: the real MiniLM captured three ways, tiny architectures, calibration data."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import onnx_ir as ir
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from qcompiler.calibration import data as calib_data  # noqa: E402
from qcompiler.capture import load, load_tokenizer  # noqa: E402
from qcompiler.calibration.resolve import builtin_sentences  # noqa: E402
from qcompiler.testing import export_legacy_minilm  # noqa: E402


@pytest.fixture(scope="session")
def minilm_files(tmp_path_factory) -> dict[str, Path]:
    """MiniLM as ONNX files: the dynamo export (opset 18) and the legacy export (opset 14)."""
    folder = tmp_path_factory.mktemp("minilm")
    dynamo = folder / "dynamo.onnx"
    ir.save(load("minilm"), dynamo)
    return {"dynamo": dynamo, "legacy": export_legacy_minilm(folder / "legacy.onnx")}


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


@pytest.fixture(scope="session")
def captured_files(tmp_path_factory, zoo_folder):
    """Factory: a zoo architecture as qcompiler captures it (torch.export + onnx), saved once per session."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = tmp_path_factory.mktemp(f"captured_{name}") / "model.onnx"
            ir.save(load(zoo_folder(name)), built[name])
        return built[name]

    return get


@pytest.fixture(scope="session")
def normalized_files(tmp_path_factory, captured_files, minilm_files):
    """Factory: the path of a normalized model ('minilm' or a zoo architecture), built once per session."""
    from qcompiler.pass_manager import PassManager
    from qcompiler.pipeline import parse_pipeline

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            model = ir.load(minilm_files["dynamo"] if name == "minilm" else captured_files(name))
            PassManager(parse_pipeline("normalize"), verify=False, progress=False).run(model)
            built[name] = tmp_path_factory.mktemp(f"normalized_{name}") / "model.onnx"
            ir.save(model, built[name])
        return built[name]

    return get

