"""KV-cache quantization on real weights: MiniLM's attention keys and values at 8 and 4 bits, with and without rotation.

    .venv/bin/python benchmarks/kv_cache.py [--write-docs]

MiniLM has no cache, but its attention reads the same K and V tensors a decoder's cache
holds, so ``kv=`` rounds them in place with the cache's quantizer (asymmetric, per head and
token): the loss in sentence-embedding cosine is what a cache of that format costs. The
weights are at 8 bits (``w8a16``) so that the cache's share shows. ``kv_rotate`` rotates
queries and keys by an online Hadamard on the head dimension (QuaRot's rule for 4-bit
keys); ``rotate`` before it also rotates the values per head, offline through v_proj and
o_proj. Calibration: the first 128 built-in calibration sentences; evaluation: the 96
held-out sentences (disjoint).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from docs_section import machine_stamp, replace_section  # noqa: E402

PIPELINES = [
    ("weights only", "w8a16"),
    ("kv=int8", "w8a16(kv=int8)"),
    ("kv=int4, no rotation", "w8a16(kv=int4,kv_rotate=false)"),
    ("kv=int4, keys rotated online", "w8a16(kv=int4)"),
    ("rotate, kv=int4, keys not rotated", "rotate,w8a16(kv=int4,kv_rotate=false)"),
    ("rotate, kv=int4, keys rotated online", "rotate,w8a16(kv=int4)"),
    ("rotate, kv=int4 group 8", "rotate,w8a16(kv=int4,kv_group=8)"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-docs", action="store_true", help="replace the kv-cache section of docs/benchmarks.md")
    args = parser.parse_args()

    from qcompiler import compiler
    from qcompiler.calibration import data as calib_data
    from qcompiler.calibration.resolve import builtin_sentences, model_inputs
    from qcompiler.capture import load, load_tokenizer
    from qcompiler.evaluation import evaluate
    from qcompiler.pass_manager import PassManager
    from qcompiler.pipeline import parse_pipeline

    source = load("minilm")
    PassManager(parse_pipeline(compiler.NORMALIZE), verify=False, progress=False).run(source)
    tokenizer, names = load_tokenizer("minilm"), model_inputs(source)
    calibration = calib_data.from_sentences(builtin_sentences("calibration")[:128], tokenizer, names, 8)
    heldout = calib_data.from_sentences(builtin_sentences("heldout"), tokenizer, names, 8).batches
    rows = []
    for label, passes in PIPELINES:
        copy = load("minilm")
        result = compiler.compile(copy, passes, calib=calibration, verify=False)
        embedding = evaluate(source, result.model, heldout).embedding
        rows.append(f"| {label} | `{passes}` | {embedding['mean_cosine']:.5f} | {embedding['min_cosine']:.5f} | "
                    f"{embedding['neighbour_agreement']:.3f} |")
        print(rows[-1], file=sys.stderr)
    body = "\n".join([
        f"{machine_stamp('benchmarks/kv_cache.py')} MiniLM, 96 held-out sentences; K and V rounded where attention "
        "reads them, as a cache of the format would store them.", "",
        "| K and V | pipeline | mean cosine | min cosine | nearest-neighbour agreement |",
        "|---|---|---:|---:|---:|", *rows])
    print(body)
    if args.write_docs:
        replace_section("kv-cache", "KV-cache quantization on MiniLM (benchmarks/kv_cache.py)", body)


if __name__ == "__main__":
    main()
