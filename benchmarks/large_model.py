"""A model whose weights exceed 2 GB: capture, normalize, save, reload, run; peak RSS.

    .venv/bin/python benchmarks/large_model.py [--workdir DIR] [--json]

The model is a random Llama (tiny config scaled up in width: hidden 4096, FFN 11008,
2 layers, untied 32k vocabulary; about 2.7 GB of fp32 weights), written once as a
Hugging Face folder. qcompiler must never build a single >2 GB ModelProto: the saved
model uses external data, and the reloaded model runs in onnxruntime with logits equal
to PyTorch's. Peak RSS is the process's own maximum resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qcompiler-large-"))

    import numpy as np
    import onnxruntime as ort
    import torch
    import transformers

    from qcompiler.capture import load
    from qcompiler.artifact import save_model
    from qcompiler.compiler import NORMALIZE
    from qcompiler.decoding import cache_layout, complete_feeds
    from qcompiler.pass_manager import PassManager
    from qcompiler.pipeline import parse_pipeline
    from qcompiler.runtime import initializer_bytes

    steps: dict[str, float] = {}
    tick = time.perf_counter()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                                      architectures=["LlamaForCausalLM"])
    module = transformers.LlamaForCausalLM(config).eval()
    ids = torch.tensor([[1, 15, 300, 4000, 31999, 7]])
    with torch.no_grad():
        reference = module(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    module.save_pretrained(workdir / "hf", max_shard_size="5GB")
    del module
    steps["build HF folder"] = time.perf_counter() - tick

    tick = time.perf_counter()
    model = load(workdir / "hf")
    steps["capture (torch.export + onnx)"] = time.perf_counter() - tick
    weight_bytes = initializer_bytes(model)

    tick = time.perf_counter()
    PassManager(parse_pipeline(NORMALIZE), verify=False, progress=False).run(model)
    steps["normalize"] = time.perf_counter() - tick

    tick = time.perf_counter()
    out = workdir / "out" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    layout = cache_layout(model)  # captured with its KV cache: the run starts from an empty one
    del model
    steps["save (external data)"] = time.perf_counter() - tick

    tick = time.perf_counter()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = complete_feeds(layout, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())})
    logits = session.run(["logits"], feeds)[0]
    steps["reload + run in onnxruntime"] = time.perf_counter() - tick

    result = {
        "weight_gib": weight_bytes / 2**30,
        "model_onnx_bytes": out.stat().st_size,
        "external_data_gib": (out.parent / "model.onnx.data").stat().st_size / 2**30,
        "max_abs_logit_error": float(np.abs(logits - reference).max()),
        "peak_rss_gib": peak_rss_gib(),
        "seconds": steps,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"weights {result['weight_gib']:.2f} GiB; model.onnx {result['model_onnx_bytes'] / 2**10:.0f} KiB + "
          f"{result['external_data_gib']:.2f} GiB external data; max |logit error| vs PyTorch "
          f"{result['max_abs_logit_error']:.2e}; peak RSS {result['peak_rss_gib']:.2f} GiB")
    print()
    print("| step | seconds |")
    print("|---|---:|")
    for step, seconds in steps.items():
        print(f"| {step} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
