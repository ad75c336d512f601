"""Find the convolutions of a normalized graph, and view their weights as matrices.

A convolution ``Conv(x, W[, b])`` with ``W [C_out, C_in / groups, k...]`` a constant is a
linear map of each input patch: ``y[o] = sum_{c, k} W[o, c, k] x[c, k]``. Flattened as a
matrix ``[C_in / groups * prod(k), C_out]`` (the reduction along rows, as a MatMul weight
is stored), every weight quantizer written for linears applies unchanged: per output
channel is per column, groups run along the flattened patch. The bias stays float inside
the Conv (normalize has folded BatchNormalization into ``W`` and ``b`` already).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.linears import constant_array, module_path


@dataclass(frozen=True)
class Convolution:
    """One ``Conv`` node with a constant weight: the unit the quantize pass gives a scheme."""

    node: ir.Node
    weight: ir.Value
    kernel_shape: tuple[int, ...]  # the weight's shape, [C_out, C_in / groups, k...]

    @property
    def name(self) -> str:
        return self.node.name or self.weight.name or "conv"

    @property
    def layer(self) -> str:
        """The source module's path where the exporter kept one (name scopes, ``<path>.weight``), else `name`."""
        return module_path(self.node, ((self.weight, ".weight"),), self.name)

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        return self.node.outputs[0]

    @property
    def groups(self) -> int:
        attribute = self.node.attributes.get("group")
        return int(attribute.value) if attribute is not None else 1

    @property
    def in_channels(self) -> int:
        """Channels of the input tensor (axis 1), what an activation group along channels divides."""
        return self.kernel_shape[1] * self.groups

    channel_axis = 1

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    def as_matrix(self, weight: np.ndarray) -> np.ndarray:
        """``W [C_out, C_in/g, k...]`` as ``[C_in/g * prod(k), C_out]``, the layout the weight quantizers take."""
        return np.ascontiguousarray(weight.reshape(weight.shape[0], -1).T)

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """The inverse of `as_matrix`."""
        return np.ascontiguousarray(matrix.T.reshape(self.kernel_shape))


def as_convolution(node: ir.Node) -> Convolution | None:
    """The node as a `Convolution`: a standard ``Conv`` whose weight is a constant of rank 3 or more, else None."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    array = constant_array(node.inputs[1])
    if array is None or array.ndim < 3:
        return None
    return Convolution(node, node.inputs[1], tuple(int(d) for d in array.shape))


def find_convolutions(graph: ir.Graph) -> list[Convolution]:
    """Every standard ``Conv`` with a constant kernel (1-D, 2-D, 3-D), in graph order."""
    return [conv for conv in map(as_convolution, graph) if conv is not None]
