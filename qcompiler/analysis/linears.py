"""Find the linear layers of a normalized graph.

In the canonical form a linear is ``MatMul(x, W)`` with ``W`` a constant ``[C_in, C_out]``
initializer, optionally followed by ``Add(., b)`` with a constant bias of ``C_out``
elements (either operand order). Normalization rewrites ``Gemm`` into this form, so
every exporter's linears are found by this one matcher.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class Linear:
    """One linear sink ``y = x W + b`` (``W`` stored ``[C_in, C_out]`` as MatMul wants it)."""

    matmul: ir.Node
    weight: ir.Value
    bias_add: ir.Node | None
    bias: ir.Value | None

    @property
    def name(self) -> str:
        return self.matmul.name or self.weight.name or "linear"

    @property
    def node(self) -> ir.Node:
        """The node a quantize annotation goes on (the same role as `Convolution.node`)."""
        return self.matmul

    @property
    def layer(self) -> str:
        """The source module's path (``encoder.layer.0.output.dense``) where the capture kept it, else `name`."""
        return module_path(self.matmul, ((self.bias, ".bias"), (self.weight, ".weight")), self.name)

    @property
    def input(self) -> ir.Value:
        return self.matmul.inputs[0]

    @property
    def output(self) -> ir.Value:
        return self.bias_add.outputs[0] if self.bias_add is not None else self.matmul.outputs[0]

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def in_channels(self) -> int:
        """Channels of the input (its last axis), what an activation group divides."""
        return self.in_features

    channel_axis = -1  # where the input's channels are (a convolution's are on axis 1)

    def as_matrix(self, weight: np.ndarray) -> np.ndarray:
        """The weight in the layout the weight quantizers take: already ``[C_in, C_out]``."""
        return weight

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        return matrix


def module_path(node: ir.Node, parameters: Iterable[tuple[ir.Value | None, str]], fallback: str) -> str:
    """The source module's path of a layer: from the node's name scopes, else a ``<path>.weight`` name, else ``fallback``.

    Users name layers by module path; exporters keep it in the node's name scopes
    (torch dynamo) or in parameter names, while node names are often just numbered.
    """
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            path = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            path = []
        if len(path) >= 2 and path[-2]:
            return path[-2]
    for value, suffix in parameters:
        if value is not None and value.name and suffix in value.name:
            return value.name.split(suffix)[0]
    return fallback


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant (initializer or Constant node output), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None:
            return attr.as_tensor().numpy()
    return None


def is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def find_linears(graph: ir.Graph) -> list[Linear]:
    """Every ``MatMul`` with a constant 2-D right operand, with its bias ``Add`` if any."""
    linears = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        weight = node.inputs[1]
        if not is_constant(weight) or weight.shape is None or len(weight.shape) != 2:
            continue
        bias_add, bias = _bias_of(node, int(weight.shape[1]))
        linears.append(Linear(node, weight, bias_add, bias))
    return linears


def _bias_of(matmul: ir.Node, out_features: int) -> tuple[ir.Node | None, ir.Value | None]:
    uses = list(matmul.outputs[0].uses())
    if len(uses) != 1 or matmul.outputs[0].is_graph_output():
        return None, None
    user = uses[0].node
    if user.op_type != "Add" or user.domain not in ("", "ai.onnx"):
        return None, None
    other = user.inputs[1 - uses[0].idx]
    if not is_constant(other) or other.shape is None:
        return None, None
    if [d for d in other.shape if d != 1] != [out_features] or other.shape[-1] != out_features:
        return None, None
    return user, other
