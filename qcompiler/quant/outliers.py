"""Outlier split (LLM.int8()): the few input channels with outlier magnitudes run in float, the rest in int8.

A handful of a linear's input channels carry activations far above the rest (MiniLM: up
to ~40x the median channel). One int8 scale per tensor or token must then cover them,
and every other channel gets a few levels. LLM.int8() takes those channels out:

    y = x[:, O] W[O] + Q(x * m) Q(W * m)        O = {c : max |x_c| > threshold on calibration}, m = 0 on O, 1 elsewhere

The int8 product reads ``x * m``, so its activation range (static or per token), its
weight scales (rows O are zero) and GPTQ's ``X^T X`` all come from the other channels.
Once a static range is observed the mask has done its work: the quantizer clips channels
O to that range and the zero rows O of ``Q(W)`` multiply them away, so a static quantizer
reads ``x`` itself (`unmasked`) and the artifact spends no pass over the activation on it.
The float part gathers O and multiplies by ``W[O]``, stored in fp16 as LLM.int8() keeps
it; it is added after the bias, so the lowerings still see the quantized linear's
``MatMul -> Add(bias)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_ir as ir

from qcompiler.graph import add_beside, add_initializer, insert_after_producer, redirect_uses, unique_node_name, \
    unique_value_name

KEY = "qcompiler.outliers"  # on the float part's MatMul (float by design, never a linear to quantize) and the mask


def outlier_channels(absmax: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of the channels whose calibration magnitude exceeds ``threshold``."""
    return np.flatnonzero(np.asarray(absmax) > threshold)


def mask_inliers(graph: ir.Graph, source: ir.Value, channels: np.ndarray, in_channels: int,
                 readers: Sequence[ir.Node], name: str) -> ir.Value:
    """Make ``readers`` read ``source`` with ``channels`` zeroed (``x * m``); returns that value."""
    mask = np.ones(in_channels, np.float32)
    mask[channels] = 0.0
    mul = ir.node("Mul", [source, add_initializer(graph, f"{name}_inlier_mask", mask)],
                  name=unique_node_name(graph, f"{name}_inliers"))
    mul.metadata_props[KEY] = "inlier mask"
    result = mul.outputs[0]
    result.name = unique_value_name(graph, f"{name}_inliers")
    result.shape, result.type = source.shape, source.type
    insert_after_producer(graph, source, mul)
    redirect_uses(graph, source, result, readers=readers, graph_output=False)
    return result


def unmasked(value: ir.Value) -> ir.Value:
    """What an inlier mask reads if ``value`` is its output, else ``value``: a static quantizer's input.

    Exact (see the module docstring): the static range clips channels O and ``Q(W)``'s zero rows cancel them.
    """
    mask = value.producer()
    return mask.inputs[0] if _is_mask(mask) else value


def remove_unused_mask(value: ir.Value | None) -> None:
    """Drop the inlier mask producing ``value`` once nothing reads it (dynamic quantizers still do)."""
    mask = None if value is None else value.producer()
    if not _is_mask(mask) or value.uses() or value.is_graph_output():
        return
    graph, factor = mask.graph, mask.inputs[1]
    graph.remove(mask, safe=True)
    if not factor.uses():
        del graph.initializers[factor.name]


def _is_mask(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Mul" and node.metadata_props.get(KEY) == "inlier mask"


def add_float_part(graph: ir.Graph, source: ir.Value, output: ir.Value, weight: np.ndarray, channels: np.ndarray,
                   name: str) -> int:
    """Add ``source[..., O] W[O]`` to ``output`` for every reader of it; returns the bytes of ``W[O]``."""
    rows = weight[channels].astype(np.float16)
    gather = ir.node("Gather", [source, add_initializer(graph, f"{name}_outlier_channels", channels.astype(np.int64))],
                     attributes={"axis": -1}, name=unique_node_name(graph, f"{name}_outlier_gather"))
    matmul = ir.node("MatMul", [gather.outputs[0], _float(graph, f"{name}_outlier_rows", rows)],
                     name=unique_node_name(graph, f"{name}_outlier"))
    matmul.metadata_props[KEY] = "outlier channels in float (LLM.int8())"
    add_beside(graph, output, [gather, matmul.inputs[1].producer(), matmul], matmul.outputs[0],
               f"{name}_with_outliers")
    return int(rows.nbytes)


def _float(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """An fp16 constant as float32: a Cast node's output (a constant MatMul weight would look like a linear)."""
    cast = ir.node("Cast", [add_initializer(graph, name, array)], attributes={"to": ir.DataType.FLOAT},
                   name=unique_node_name(graph, f"{name}_cast"))
    return cast.outputs[0]
