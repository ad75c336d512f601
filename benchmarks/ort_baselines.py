"""onnxruntime.quantization's own quantized models, to compare against ours on the same data.

Each function reads an fp32 ONNX file and writes one quantized file to ``out_path`` (never the
input). All of them quantize only the linear layers (MatMuls with a constant weight), the same
nodes qcompiler quantizes, so differences come from the algorithm and not from the coverage.

    .venv/bin/python benchmarks/ort_baselines.py [MODEL.onnx] [OUT_DIR]

quantizes MiniLM's normalized model every way available here and prints the cosine of the
mean-pooled embeddings against fp32 on the held-out sentences.
"""

from __future__ import annotations

import importlib.util
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
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    GPTQWeightOnlyQuantConfig,
    HQQWeightOnlyQuantConfig,
    MatMulNBitsQuantizer,
)

Feeds = list[dict[str, np.ndarray]]


def linear_matmuls(model_path: str | Path) -> list[str]:
    """Names of the MatMuls whose second input is an initializer: the linear layers.

    Passing these to ORT keeps it off the activation x activation attention MatMuls, which
    qcompiler leaves in float too.
    """
    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def _other_matmuls(model_path: Path) -> list[str]:
    """MatMuls that are not linear layers, for APIs that only take an exclusion list."""
    linear = set(linear_matmuls(model_path))
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.name not in linear]


def _paths(fp32_path: str | Path, out_path: str | Path) -> tuple[Path, Path]:
    """Resolve both paths and refuse to overwrite the input model."""
    src, dst = Path(fp32_path).resolve(), Path(out_path).resolve()
    if src == dst:
        raise ValueError(f"out_path must differ from the input model {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return src, dst


class _FeedReader(CalibrationDataReader):
    """Replays a list of feed dicts; copyable, since ORT's GPTQ deep-copies its reader."""

    def __init__(self, feeds: Feeds):
        self.feeds, self.index = list(feeds), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index == len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]


def w8a8_static(
    fp32_path: str | Path,
    out_path: str | Path,
    calib_feeds: Feeds,
    per_channel: bool = True,
    activation_type: Literal["int8", "uint8"] = "int8",
    calibrate_method: CalibrationMethod = CalibrationMethod.MinMax,
) -> Path:
    """Static W8A8 in QDQ format: int8 weights, activations calibrated on ``calib_feeds``.

    int8 activations are symmetric (ORT's recommendation for int8 x int8 kernels), uint8 ones
    asymmetric. ``quant_pre_process`` is not run: the model is already shape-inferred and
    fused by qcompiler's normalize pipeline, and ORT quantizes it without complaint.
    """
    src, dst = _paths(fp32_path, out_path)
    quantize_static(
        src,
        dst,
        _FeedReader(calib_feeds),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=linear_matmuls(src),
        per_channel=per_channel,
        activation_type=QuantType.QInt8 if activation_type == "int8" else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=calibrate_method,
        extra_options={"ActivationSymmetric": activation_type == "int8"},
    )
    return dst


def w8a8_dynamic(fp32_path: str | Path, out_path: str | Path) -> Path:
    """Dynamic W8A8: per-channel int8 weights, activation ranges measured at run time."""
    src, dst = _paths(fp32_path, out_path)
    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=linear_matmuls(src),
        per_channel=True,
        weight_type=QuantType.QInt8,
    )
    return dst


def available_w4a16_algorithms() -> list[str]:
    """The w4a16 algorithms that can run here.

    RTN and GPTQ are implemented inside onnxruntime (GPTQ through its vendored copy of
    neural-compressor's code, so the ``neural_compressor`` package is not needed); HQQ needs torch.
    """
    algorithms = ["rtn", "gptq"]
    if importlib.util.find_spec("torch") is not None:
        algorithms.append("hqq")
    return algorithms


def w4a16(
    fp32_path: str | Path,
    out_path: str | Path,
    algorithm: Literal["rtn", "gptq", "hqq"] = "rtn",
    block_size: int = 128,
    symmetric: bool = False,
    calib_feeds: Feeds | None = None,
    accuracy_level: int | None = None,
) -> Path:
    """4-bit blockwise weights, float activations: linear MatMuls become com.microsoft MatMulNBits.

    ``block_size`` is the quantization group along K. ``accuracy_level`` is MatMulNBits'
    compute type (4 = int8 activations on CPU); HQQ's quantizer cannot set it. HQQ is asymmetric
    only (float zero points). GPTQ needs ``calib_feeds``.
    """
    if algorithm not in ("rtn", "gptq", "hqq"):
        raise ValueError(f"unknown w4a16 algorithm {algorithm!r}")
    if algorithm not in available_w4a16_algorithms():
        raise RuntimeError(f"onnxruntime's {algorithm.upper()} needs torch, which is not installed")
    if algorithm == "gptq" and not calib_feeds:
        raise ValueError("GPTQ needs calib_feeds")
    if algorithm == "hqq" and (symmetric or accuracy_level is not None):
        raise ValueError("ORT's HQQ is asymmetric only and does not set accuracy_level")
    src, dst = _paths(fp32_path, out_path)
    if algorithm == "rtn":
        config = DefaultWeightOnlyQuantConfig(block_size, symmetric, accuracy_level)
    elif algorithm == "gptq":  # the group size comes from the quantizer's block_size below
        config = GPTQWeightOnlyQuantConfig(_FeedReader(calib_feeds))
    else:
        config = HQQWeightOnlyQuantConfig(block_size=block_size)
    quantizer = MatMulNBitsQuantizer(
        str(src),
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        nodes_to_exclude=_other_matmuls(src),
        algo_config=config,
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst))
    return dst
