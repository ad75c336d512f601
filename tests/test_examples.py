"""Every script under examples/ runs (smoke settings) and prints what its docstring promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(args: list[str], cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.slow
def test_compile_minilm_measures_the_real_model(tmp_path):
    output = run([sys.executable, str(EXAMPLES / "compile_minilm.py"), "--smoke", "-o", "minilm"], tmp_path)
    assert "w8a8: quantized MatMul 37 of 50" in output
    cosine = float(output.split("mean cosine ")[1].split(",")[0])
    assert 0.99 < cosine < 1.0  # quantized: close to FP32, not equal to it
    assert (tmp_path / "minilm" / "model.onnx").is_file()


def test_cli_recipes_write_three_artifacts(tmp_path, zoo_folder):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, 256, (16, 16)).astype(np.int64),
             attention_mask=np.ones((16, 16), np.int64))
    qcompile = str(Path(sys.executable).parent / "qcompile")
    output = run(["bash", str(EXAMPLES / "cli_recipes.sh")], tmp_path,
                 {"MODEL": str(zoo_folder("bert")), "CALIB": "calib.npz", "OUT": "recipes", "QCOMPILE": qcompile})
    for recipe in ("w8a8", "w4a16", "w4a8"):
        assert (tmp_path / "recipes" / recipe / "model.onnx").is_file()
        assert f"== {recipe}: " in output and "quantized MatMul" in output


def test_torch_module_runs_at_shapes_other_than_the_example(tmp_path):
    output = run([sys.executable, str(EXAMPLES / "torch_module.py"), "-o", "module"], tmp_path)
    assert "'shape': ['batch', 'sequence']" in output
    assert "batch 1 x 7 tokens: output [1, 4]" in output and "batch 3 x 40 tokens: output [3, 4]" in output


def test_foreign_onnx_keeps_the_classifier_accurate(tmp_path):
    output = run([sys.executable, str(EXAMPLES / "foreign_onnx.py"), "--smoke", "-o", "ocr"], tmp_path)
    assert "quantized Conv 53 of 53" in output
    fp32, quantized = (float(part.split()[-1]) for part in output.split("lines: ")[1].split(", "))
    assert quantized >= fp32 - 0.07  # at most two of 32 lines flip


def test_causal_lm_generates_scores_and_loads_in_transformers(tmp_path):
    output = run([sys.executable, str(EXAMPLES / "causal_lm.py"), "-o", "llama"], tmp_path)
    assert "greedy continuation of [1, 17, 42, 99, 5]" in output and "perplexity on 256 held-out tokens" in output
    next_token = output.split("its next token after the prompt: ")[1].split()[0]
    first = output.split("the artifact's first generated token: ")[1].split(")")[0]
    assert next_token == first
