"""onnxruntime.quantization's own quantized models, to compare against ours on the same data.

Each function reads an fp32 ONNX file and writes one quantized file to ``out_path``, never the
input. All of them quantize only the linear layers (MatMuls with a constant weight), the nodes
qcompiler quantizes, so the comparison is between algorithms and not between coverages.

    .venv/bin/python benchmarks/ort_baselines.py [OUT_DIR]

builds MiniLM's normalized model, quantizes it every way ORT can here and prints a markdown
table of the held-out cosine against fp32 (mean-pooled, L2-normalized embeddings).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

# Importing matmul_nbits_quantizer runs logging.basicConfig(level=INFO), which would turn on
# INFO logs process-wide (one line per node); put the root logger back as it was.
_root_handlers, _root_level = list(logging.getLogger().handlers), logging.getLogger().level
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    GPTQWeightOnlyQuantConfig,
    HQQWeightOnlyQuantConfig,
    MatMulNBitsQuantizer,
)

logging.getLogger().handlers[:] = _root_handlers
logging.getLogger().setLevel(_root_level)

Feeds = list[dict[str, np.ndarray]]


def _matmul_weights(model_path: str | Path) -> dict[str, list[int] | None]:
    """Each MatMul's name and the shape of its constant second input (None if not constant)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    return {n.name: shapes.get(n.input[1]) for n in graph.node if n.op_type == "MatMul"}


def linear_matmuls(model_path: str | Path) -> list[str]:
    """Names of the MatMuls whose second input is an initializer: the linear layers.

    Handing these to ORT keeps it off the activation x activation attention MatMuls, which
    qcompiler leaves in float too.
    """
    return [name for name, shape in _matmul_weights(model_path).items() if shape is not None]


def _paths(fp32_path: str | Path, out_path: str | Path) -> tuple[Path, Path]:
    """Resolve both paths and refuse to overwrite the input model."""
    src, dst = Path(fp32_path).resolve(), Path(out_path).resolve()
    if src == dst:
        raise ValueError(f"out_path must differ from the input model {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return src, dst


class _FeedReader(CalibrationDataReader):
    """Replays a list of feed dicts; deep-copyable, since ORT's GPTQ copies its reader."""

    def __init__(self, feeds: Feeds):
        self.feeds, self.index = list(feeds), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index == len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]


def _pad_feeds(feeds: Feeds) -> Feeds:
    """Zero-pad every input's last axis to the longest sequence in ``feeds``.

    ORT's histogram calibrators (Percentile, Entropy, Distribution) ``np.asarray`` the batches
    of each tensor and fail on ragged sequence lengths. Zero is the pad id, a masked position
    and segment 0 for BERT-style inputs; the padded positions do enter the histograms.
    """
    length = max(v.shape[-1] for feed in feeds for v in feed.values())
    return [{k: np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, length - v.shape[-1])]) for k, v in feed.items()}
            for feed in feeds]


def w8a8_static(
    fp32_path: str | Path,
    out_path: str | Path,
    calib_feeds: Feeds,
    per_channel: bool = True,
    activation_type: Literal["int8", "uint8"] = "int8",
    activation_symmetric: bool = False,
    calibrate_method: CalibrationMethod = CalibrationMethod.MinMax,
) -> Path:
    """Static W8A8 in QDQ format: int8 weights, per-tensor activation ranges from ``calib_feeds``.

    Only MatMul inputs are quantized. ORT's default also puts a QuantizeLinear on every MatMul
    output, which qcompiler's W8A8 does not do and which costs MiniLM most of its accuracy
    (held-out cosine 0.936 instead of 0.989). Activations are asymmetric by default, as in
    qcompiler's w8a8 preset; int8 and uint8 then score the same, symmetric int8 lower (0.977).
    No ``quant_pre_process``: its symbolic shape inference fails on the opset-23 model, and
    without it the pre-processed model quantizes to the same cosine.
    """
    src, dst = _paths(fp32_path, out_path)
    if calibrate_method != CalibrationMethod.MinMax:
        calib_feeds = _pad_feeds(calib_feeds)
    quantize_static(
        src, dst, _FeedReader(calib_feeds), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
        nodes_to_quantize=linear_matmuls(src), per_channel=per_channel, weight_type=QuantType.QInt8,
        activation_type=QuantType.QInt8 if activation_type == "int8" else QuantType.QUInt8,
        calibrate_method=calibrate_method,
        extra_options={"ActivationSymmetric": activation_symmetric, "OpTypesToExcludeOutputQuantization": ["MatMul"]},
    )
    return dst


def w8a8_dynamic(fp32_path: str | Path, out_path: str | Path) -> Path:
    """Dynamic W8A8: per-channel int8 weights; activations uint8, one range per tensor per run.

    ORT's dynamic activations are per tensor, coarser than qcompiler's per-token w8a8-dyn.
    """
    src, dst = _paths(fp32_path, out_path)
    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], nodes_to_quantize=linear_matmuls(src),
                     per_channel=True, weight_type=QuantType.QInt8)
    return dst


def available_w4a16_algorithms() -> list[str]:
    """The w4a16 algorithms that run here.

    RTN and GPTQ are implemented inside onnxruntime (GPTQ in its vendored copy of
    neural-compressor's code, so the ``neural_compressor`` package is not needed); HQQ needs torch.
    That GPTQ runs but compensates nothing: it reads the error-propagation coefficients from
    ``Hinv[i:, i]``, the zero lower triangle of an upper Cholesky factor, so its integer weights
    are RTN's (checked bit for bit on MiniLM at g64). Label it as ORT's GPTQ, not as GPTQ.
    """
    return ["rtn", "gptq"] + (["hqq"] if importlib.util.find_spec("torch") else [])


def w4a16(
    fp32_path: str | Path,
    out_path: str | Path,
    algorithm: Literal["rtn", "gptq", "hqq"] = "rtn",
    block_size: int = 128,
    symmetric: bool = False,
    calib_feeds: Feeds | None = None,
    accuracy_level: int | None = None,
) -> Path:
    """4-bit weights in groups of ``block_size`` along K, float activations (com.microsoft MatMulNBits).

    ``accuracy_level`` is MatMulNBits' compute type (4: int8 activations on CPU). ORT's HQQ is
    asymmetric only (float zero points) and cannot set it. GPTQ needs ``calib_feeds`` and
    takes minutes (numpy, one Hessian per distinct input); see ``available_w4a16_algorithms``
    for what it really computes. Asymmetric, it cannot pack zero points when a weight has an
    odd number of blocks along K (MiniLM's K=384 at g128); symmetric, it re-rounds its weights
    onto a grid with a different scale, so it scores below symmetric RTN.
    """
    if algorithm not in ("rtn", "gptq", "hqq"):
        raise ValueError(f"unknown w4a16 algorithm {algorithm!r}")
    if algorithm not in available_w4a16_algorithms():
        raise RuntimeError(f"onnxruntime's {algorithm.upper()} needs torch, which is not installed")
    if algorithm == "hqq" and (symmetric or accuracy_level is not None):
        raise ValueError("onnxruntime's HQQ is asymmetric only and does not set accuracy_level")
    src, dst = _paths(fp32_path, out_path)
    weights = _matmul_weights(src)
    if algorithm == "gptq":
        if not calib_feeds:
            raise ValueError("GPTQ needs calib_feeds")
        odd = sorted({s[0] for s in weights.values() if s and not symmetric and -(-s[0] // block_size) % 2})
        if odd:
            raise RuntimeError(f"onnxruntime's asymmetric GPTQ cannot pack zero points for K={odd} in "
                               f"an odd number of {block_size}-blocks; use another block_size or symmetric")
        config = GPTQWeightOnlyQuantConfig(_FeedReader(calib_feeds))  # group size: block_size below
    elif algorithm == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=block_size)
    else:
        config = DefaultWeightOnlyQuantConfig(block_size, symmetric, accuracy_level)
    quantizer = MatMulNBitsQuantizer(
        str(src), block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
        nodes_to_exclude=[name for name, shape in weights.items() if shape is None], algo_config=config,
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst))
    return dst


def _embeddings(model_path: Path, feeds: Feeds) -> np.ndarray:
    """Attention-mask-weighted mean of the first output, L2-normalized: one row per sentence."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    rows = []
    for feed in feeds:
        mask = feed["attention_mask"][..., None].astype(np.float32)
        pooled = (session.run(None, feed)[0] * mask).sum(1) / mask.sum(1)
        rows.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(rows)


def _main(out_dir: Path) -> None:
    import onnx_ir as ir

    import qcompiler
    from qcompiler.calibration import data as calib_data
    from qcompiler.capture import load_tokenizer
    from qcompiler.calibration.resolve import builtin_sentences, model_inputs

    out_dir.mkdir(parents=True, exist_ok=True)
    model = qcompiler.compile("minilm", "normalize", verify=False).model
    fp32 = out_dir / "minilm.onnx"
    ir.save(model, fp32)
    tokenizer, names = load_tokenizer("minilm"), model_inputs(model)
    calib, held = (calib_data.from_sentences(builtin_sentences(split), tokenizer, names, 8).batches
                   for split in ("calibration", "heldout"))
    configs = {
        "w8a8 static int8 asym": lambda out: w8a8_static(fp32, out, calib),
        "w8a8 static uint8 asym": lambda out: w8a8_static(fp32, out, calib, activation_type="uint8"),
        "w8a8 static int8 sym": lambda out: w8a8_static(fp32, out, calib, activation_symmetric=True),
        "w8a8 dynamic": lambda out: w8a8_dynamic(fp32, out),
        "w4a16 rtn asym g128": lambda out: w4a16(fp32, out),
        "w4a16 rtn sym g128": lambda out: w4a16(fp32, out, symmetric=True),
        "w4a16 hqq g128": lambda out: w4a16(fp32, out, "hqq"),
        "w4a16 gptq asym g128": lambda out: w4a16(fp32, out, "gptq", calib_feeds=calib),
        "w4a16 gptq sym g128": lambda out: w4a16(fp32, out, "gptq", symmetric=True, calib_feeds=calib),
    }
    reference = _embeddings(fp32, held)
    print("| ORT config | mean cosine | min cosine | quantize s |\n|---|---|---|---|")
    for i, (name, quantize) in enumerate(configs.items()):
        start = time.perf_counter()
        try:
            path = quantize(out_dir / f"ort_{i}.onnx")
        except RuntimeError as error:
            print(f"| {name} | unavailable: {error} | | |")
            continue
        seconds = time.perf_counter() - start
        cosine = (_embeddings(path, held) * reference).sum(1)
        print(f"| {name} | {cosine.mean():.4f} | {cosine.min():.4f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # the default keeps none of the ~90 MB models
        _main(Path(sys.argv[1] if len(sys.argv) > 1 else tmp))
