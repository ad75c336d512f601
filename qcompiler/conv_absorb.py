"""Absorb a per-channel scale and shift of a convolution region into its kernels, biases and norm.

A region's sinks read ``x' = (x - z) / s`` along axis 1 instead of ``x``. For a sink
``y = W * x + b`` (``W [C_out, C_in / g, k...]``, input channel ``c`` of group ``G`` read by
the outputs of that group through ``W[:, c - G C_in / g]``)::

    W'[:, c] = s_c W[:, c]         b' = b + sum_{c, k} W[:, c, k] z_c      (no padding: see conv_regions)

and the producer emits ``x'``: a Conv divides output channel ``c`` of its kernel and
bias (``b_c' = (b_c - z_c) / s_c``), a BatchNormalization its scale and bias alike;
readers of the producer's output outside the region get ``x' * s + z`` back. Constants
are rewritten copy-on-write (`qcompiler.absorb.rewrite_constant`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.absorb import (Notes, compensate_readers, mark_node_output_transformed, rewrite_constant,
                              set_optional_constant)
from qcompiler.analysis.convolutions import Convolution
from qcompiler.analysis.conv_regions import ConvRegion
from qcompiler.analysis.linears import constant_array


def input_channel_view(conv: Convolution, vector: np.ndarray) -> np.ndarray:
    """A vector over the input channels laid out like the kernel's ``[C_out, C_in / g]`` (kernel dims as 1s)."""
    out_channels, per_group = conv.kernel_shape[0], conv.kernel_shape[1]
    groups = conv.groups
    grid = np.broadcast_to(vector.reshape(groups, 1, per_group), (groups, out_channels // groups, per_group))
    return grid.reshape((out_channels, per_group) + (1,) * (len(conv.kernel_shape) - 2))


def absorb_conv_affine(graph: ir.Graph, region: ConvRegion, scale: np.ndarray | None, shift: np.ndarray | None,
                       notes: Notes, pass_name: str) -> None:
    """Make the region's producer emit ``(x - z) / s`` and its Conv sinks read it."""
    s = np.ones(region.channels) if scale is None else scale.astype(np.float64)
    z = None if shift is None or not np.any(shift) else shift.astype(np.float64)
    channel_view = (1, -1) + (1,) * (len(region.sinks[0].kernel_shape) - 2)
    compensate_readers(graph, region.source, region.foreign, s if scale is not None else None, z, channel_view)
    region.foreign = []
    for sink in region.sinks:
        if z is not None:
            kernel = constant_array(sink.node.inputs[1]).astype(np.float64)
            summed = kernel.reshape(kernel.shape[0], kernel.shape[1], -1).sum(axis=2)
            correction = (summed * input_channel_view(sink, z).reshape(summed.shape)).sum(axis=1)
            _ensure_bias(graph, sink.node, sink.kernel_shape[0])
            rewrite_constant(graph, sink.node, 2, lambda b: b + correction.reshape(b.shape), notes)
        rewrite_constant(graph, sink.node, 1, lambda w, sink=sink: w * input_channel_view(sink, s), notes)
    offset = np.zeros(region.channels) if z is None else z
    producer = region.producer
    if region.kind == "batchnorm":
        rewrite_constant(graph, producer, 1, lambda gamma: gamma / s, notes)
        rewrite_constant(graph, producer, 2, lambda beta: (beta - offset) / s, notes)
        return
    kernel_view = (-1,) + (1,) * (len(region.absorber.kernel_shape) - 1)
    rewrite_constant(graph, producer, 1, lambda w: w / s.reshape(kernel_view), notes)
    if z is not None:
        _ensure_bias(graph, producer, region.channels)
    if len(producer.inputs) > 2 and producer.inputs[2] is not None:
        rewrite_constant(graph, producer, 2, lambda b: (b - offset) / s, notes)
    mark_node_output_transformed(producer, pass_name)


def _ensure_bias(graph: ir.Graph, node: ir.Node, channels: int) -> None:
    if len(node.inputs) < 3 or node.inputs[2] is None:
        kernel = constant_array(node.inputs[1])
        set_optional_constant(graph, node, 2, np.zeros(channels, kernel.dtype))
