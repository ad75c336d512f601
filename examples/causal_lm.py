"""A causal LM end to end: compile with a KV cache, generate, score perplexity, and write a vLLM checkpoint.

    .venv/bin/python examples/causal_lm.py [-o out/llama]

No pre-trained decoder installs here, so the model is a tiny Llama with random weights,
built into a folder the way ``save_pretrained`` writes one: the figures show the path
(decoding with the cache equals recomputing, perplexity of source and artifact on the
same tokens), not an accuracy claim. With a real checkpoint folder, pass ``--model``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
import transformers

import qcompiler
from qcompiler import decoding, next_token
from qcompiler.runtime import make_session

PIPELINE = "smooth,rotate(mode=offline),w4a16(group_size=32,head=same)"


def tiny_llama(folder: Path) -> Path:
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face causal-LM folder (default: a tiny random Llama)")
    parser.add_argument("-o", "--output", default="out/llama")
    args = parser.parse_args()

    out = Path(args.output)
    folder = Path(args.model) if args.model else tiny_llama(out / "source")
    rng = np.random.default_rng(0)
    calibration = [{"input_ids": rng.integers(0, 256, (4, 32)).astype(np.int64),
                    "attention_mask": np.ones((4, 32), np.int64)} for _ in range(8)]
    # The compressed-tensors format writes the checkpoint vLLM loads beside the simulate model.onnx.
    result = qcompiler.compile(str(folder), PIPELINE, calib=calibration, backend="compressed-tensors",
                               output=out / "artifact", force=True)
    print("\n".join(result.manifest["summary"]))
    print(result.manifest["notes"][-1])

    model = ir.load(out / "artifact" / "model.onnx")
    layout = decoding.require_layout(model, "this example")
    session = make_session(model)
    prompt = np.array([[1, 17, 42, 99, 5]])
    generated = decoding.generate(session, layout, prompt, max_new_tokens=12)
    print(f"greedy continuation of {prompt[0].tolist()}: {generated.tokens[0].tolist()} "
          f"({generated.decode_tokens_per_second:.0f} tokens/s)")

    source = qcompiler.load(str(folder))
    text = rng.integers(0, 256, 256)  # held-out tokens: not the calibration batches
    scores = {name: next_token.perplexity(make_session(m), decoding.require_layout(m, "perplexity"), text,
                                          window=64, stride=32).value
              for name, m in (("source", source), ("compiled", model))}
    print(f"perplexity on {len(text)} held-out tokens: source {scores['source']:.2f}, "
          f"compiled {scores['compiled']:.2f}")

    checkpoint = transformers.AutoModelForCausalLM.from_pretrained(
        out / "artifact", dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        logits = checkpoint(input_ids=torch.from_numpy(prompt)).logits[0, -1]
    print(f"transformers loads the checkpoint; its next token after the prompt: {int(logits.argmax())} "
          f"(the artifact's first generated token: {int(generated.tokens[0, 0])})")


if __name__ == "__main__":
    main()
