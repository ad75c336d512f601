"""Lower the quantize pass's simulate form to onnxruntime's integer kernels.

Per quantized linear (read from its ``qcompiler.quant`` annotation):

- int8 weights with static int8 activations: the Q/DQ form already is what onnxruntime
  fuses into MatMulIntegerToFloat (one Q/DQ pair per consumer, see
  `qcompiler.quant.simulate.per_consumer`); kept as it is.
- int8 weights with per-token dynamic int8 activations: an integer GEMM
  (``MatMulIntegerToFloat``) on the codes, computed once per source tensor, rescaled by the
  per-column weight scale and the per-row activation scale::

      y = (round(x / s_row) @ W_q) * s_col * s_row        s_row = max|x_row| / 127

- 4-bit weights in groups along the input (and per channel, as equal-scale 128-blocks):
  ``com.microsoft.MatMulNBits``. ``accuracy_level`` 0 (float compute, the simulate
  numbers) for weight-only presets; 4 (int8 activations, the fast CPU path) for w4a8,
  whose activations onnxruntime then quantizes per block of ``block_size`` along K
  instead of per token.
- Everything else (FP8, FP4, MX, NVFP4, int4 activations, int8 weight-only) stays in the
  simulate form and is reported as simulated, never as accelerated.

The int8 GEMMs take one of two layouts (``int8``). ``u8s8``: uint8 activations times int8
weights, the fastest path on CPUs with VNNI (``vpdpbusd`` accumulates in 32 bits) and on
Arm. On x86 without VNNI the same path multiplies with ``vpmaddubsw``, which adds pairs
of u8 x s8 products into 16-bit lanes with saturation (255 x 127 x 2 > 32767): on
MiniLM W8A8-dyn that cost cosine 0.9938 against the simulate form. ``u8u8`` stores the
weights as uint8 codes + 128 with zero point 128 (the same integers); onnxruntime then
runs its u8 x u8 kernels, which widen to 16 bits and accumulate in 32 (0.9995 there).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir

from qcompiler.backend import Lowering
from qcompiler.graph import MS_DOMAIN, add_initializer, drop_unused, replace_node, unique_node_name, value_named
from qcompiler.quant.annotation import ActivationAnnotation, WeightAnnotation, annotated_layers
from qcompiler.quant.formats import pack
from qcompiler.quant.simulate import weight_parts

NBITS_BLOCK = 128
Int8Layout = Literal["u8s8", "u8u8"]


def lower(model: ir.Model, int8: Int8Layout = "u8s8") -> Lowering:
    """Rewrite every quantized linear of ``model`` to the kernel onnxruntime runs it with, int8 GEMMs as ``int8``."""
    result = Lowering()
    graph = model.graph
    tokens: dict = {}  # activation source -> its per-token uint8 codes and row scales
    for node, annotation in annotated_layers(model):
        layer, weight, activation = annotation.layer, annotation.weight, annotation.activation
        kernel = _choose(node, weight, activation)
        if kernel is None:
            result.simulated[layer] = _why_simulated(node, weight, activation)
            continue
        if kernel == "MatMulNBits":
            _to_matmul_nbits(model, node, weight, activation)
        elif kernel == "MatMulIntegerToFloat (per-token)":
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            _to_matmul_integer(graph, node, activation, tokens, int8)
        elif int8 == "u8u8":
            _unsigned_weight(graph, node)
        result.kernels[layer] = kernel if kernel != "QDQ" else _fused_from_qdq(node)
    drop_unused(graph)
    return result


def qdq_dialect(model: ir.Model, int8: Int8Layout = "u8s8") -> Lowering:
    """The standard-ONNX dialect: says per layer what onnxruntime makes of the Q/DQ form.

    Static int8 Q/DQ pairs fuse into MatMulIntegerToFloat and blocked 4-bit
    DequantizeLinear + MatMul into MatMulNBits when onnxruntime loads the model; other
    runtimes read the same standard ops. Per-token activations stay float ops. The only
    rewrite: with ``int8="u8u8"`` the static layers' weights become uint8 with zero point
    128 (standard DequantizeLinear, the same values).
    """
    result = Lowering()
    for node, annotation in annotated_layers(model):
        layer, weight, activation = annotation.layer, annotation.weight, annotation.activation
        kernel = _choose(node, weight, activation)
        if kernel == "QDQ":
            if int8 == "u8u8":
                _unsigned_weight(model.graph, node)
            result.kernels[layer] = f"Q/DQ (onnxruntime fuses it into {_fused_from_qdq(node).split()[0]})"
        elif kernel == "MatMulNBits" and weight.spec.granularity == "group" and activation is None:
            result.kernels[layer] = "blocked 4-bit DequantizeLinear (onnxruntime fuses it into MatMulNBits)"
        else:
            result.simulated[layer] = _why_simulated(node, weight, activation) if kernel is None else \
                "standard ops only in the qdq dialect (the ort dialect has a kernel for it)"
    return result


def _choose(node: ir.Node, weight: WeightAnnotation, activation: ActivationAnnotation | None) -> str | None:
    spec = weight.spec
    if not weight.native:
        return None
    if node.op_type == "Conv":
        static = activation is not None and activation.int8_static_tensor
        return "QDQ" if spec.format == "int8" and spec.granularity in ("channel", "tensor") and static else None
    if spec.format in ("int4", "uint4") and (activation is None or activation.int8_per_token):
        if spec.granularity in ("group", "channel"):
            return "MatMulNBits"
        return None
    if spec.format == "int8" and spec.granularity in ("channel", "tensor") and activation is not None:
        if activation.spec.format == "int8" and not activation.spec.dynamic:
            return "QDQ"
        if activation.int8_per_token:
            return "MatMulIntegerToFloat (per-token)"
    return None


def _fused_from_qdq(node: ir.Node) -> str:
    """The integer kernel onnxruntime makes of a static int8 Q/DQ layer when it loads the model."""
    if node.op_type == "Conv":
        return "QLinearConv (fused from Q/DQ)"
    return "MatMulIntegerToFloat (fused from Q/DQ)"


def _why_simulated(node: ir.Node, weight: WeightAnnotation, activation: ActivationAnnotation | None) -> str:
    if node.op_type == "Conv" and weight.native:
        if activation is None:
            return f"weight-only {weight.spec.describe()} runs as DequantizeLinear + float Conv"
        return (f"onnxruntime's integer convolutions take int8 weights with static per-tensor int8 activations "
                f"(QLinearConv); {weight.spec.describe()} weights with {activation.spec.describe()} activations run "
                "as Q/DQ and float ops")
    if not weight.native:
        return f"onnxruntime has no CPU kernel for {weight.spec.describe()} weights"
    if activation is None:
        return f"weight-only {weight.spec.describe()} runs as DequantizeLinear + float MatMul"
    return (f"onnxruntime has no CPU kernel for {weight.spec.describe()} weights with {activation.spec.describe()} "
            "activations")


def _to_matmul_nbits(model: ir.Model, node: ir.Node, weight: WeightAnnotation,
                     activation: ActivationAnnotation | None) -> None:
    graph = model.graph
    codes, scale, zero, _ = weight_parts(node)
    k, n = codes.shape
    offset = 0 if weight.spec.format == "uint4" else 8
    unsigned = codes.astype(np.int16) + offset
    if weight.spec.granularity == "group":
        block = weight.spec.group_size
        scales = scale  # [ceil(K/g), N]
        zeros = None if zero is None else zero.astype(np.int16) + offset
    else:  # per channel: equal-scale blocks, the same arithmetic as one block of K
        block = NBITS_BLOCK
        blocks = -(-k // block)
        scales = np.repeat(np.asarray(scale, np.float32).reshape(1, n), blocks, axis=0)
        zeros = None
    blocks = -(-k // block)
    if zeros is None:
        zeros = np.full((blocks, n), 8, np.int16)  # MatMulNBits' default zero point, stored explicitly
    padded = np.empty((blocks * block, n), np.int16)
    padded[:k] = unsigned
    padded[k:] = np.repeat(zeros[-1:], blocks * block - k, axis=0)  # dequantizes to zero
    columns = padded.T.reshape(n, blocks, block).astype(np.uint8)
    packed = pack(columns.reshape(-1), 4).reshape(n, blocks, block // 2)
    zero_bytes = np.stack([pack(zeros[:, i].astype(np.uint8), 4) for i in range(n)]).reshape(-1)
    base = node.inputs[1].name
    inputs = [node.inputs[0],
              add_initializer(graph, f"{base}_nbits", packed),
              add_initializer(graph, f"{base}_nbits_scales", np.ascontiguousarray(scales.T).reshape(-1)),
              add_initializer(graph, f"{base}_nbits_zeros", zero_bytes)]
    level = 4 if activation is not None else 0
    replacement = ir.node("MatMulNBits", inputs, domain=MS_DOMAIN, name=unique_node_name(graph, f"{node.name}_nbits"),
                          attributes={"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": level})
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    if activation is not None:
        # MatMulNBits quantizes its input itself; read the float activation, not the simulated one.
        replacement.replace_input_with(0, value_named(graph, activation.source))
    replace_node(graph, node, replacement)


def _unsigned_weight(graph: ir.Graph, node: ir.Node) -> None:
    """The int8 weight of ``node``'s DequantizeLinear as uint8 codes + 128 with zero point 128: same values, u8u8."""
    codes, scale, _, dq = weight_parts(node)
    base = node.inputs[1].name
    dq.replace_input_with(0, add_initializer(graph, f"{base}_u8", _unsigned(codes)))
    if len(dq.inputs) < 3:
        dq.resize_inputs(3)
    dq.replace_input_with(2, add_initializer(graph, f"{base}_u8_zero", np.full(scale.shape, 128, np.uint8)))


def _unsigned(codes: np.ndarray) -> np.ndarray:
    """Signed int8 codes as uint8 codes with zero point 128."""
    return (codes.astype(np.int16) + 128).astype(np.uint8)


def _to_matmul_integer(graph: ir.Graph, node: ir.Node, activation: ActivationAnnotation, tokens: dict,
                       int8: Int8Layout) -> None:
    """Per-token int8 activations: one quantization per source tensor, one integer GEMM per linear.

    The codes go to the GEMM as uint8 with zero point 128 (the same integers); the weights
    as int8 (``u8s8``) or as uint8 + 128 with zero point 128 (``u8u8``). MatMulIntegerToFloat
    applies the per-column weight scale, one Mul the per-row activation scale.
    """
    codes, scale, _, _ = weight_parts(node)
    source = activation.source
    base = node.name or "linear"
    nodes: list[ir.Node] = []

    def op(op_type: str, *inputs: ir.Value, domain: str = "", **attributes) -> ir.Value:
        made = ir.node(op_type, list(inputs), attributes=attributes, domain=domain,
                       name=unique_node_name(graph, f"{base}_{op_type.lower()}_{len(nodes)}"))
        nodes.append(made)
        return made.outputs[0]

    if source not in tokens:
        x = value_named(graph, source)
        axes = add_initializer(graph, f"{source}_token_axes", np.array([-1], np.int64))
        row_scale = op("Max", op("Div", op("ReduceMax", op("Abs", x), axes, keepdims=1),
                                add_initializer(graph, f"{source}_qmax", np.array(127.0, np.float32))),
                       add_initializer(graph, f"{source}_tiny", np.array(1e-30, np.float32)))
        # Blocked QuantizeLinear with one block per row is per-token quantization in one
        # kernel; zero point 128 (a [.., 1] tensor shaped like the scales) makes the codes uint8.
        zero = op("Cast", op("Add", op("Mul", row_scale, add_initializer(graph, f"{source}_nought",
                                                                            np.array(0.0, np.float32))),
                             add_initializer(graph, f"{source}_offset", np.array(128.0, np.float32))),
                  to=ir.DataType.UINT8)
        tokens[source] = (op("QuantizeLinear", x, row_scale, zero, axis=-1, block_size=int(codes.shape[0])),
                          row_scale)
    grid_u8, row_scale = tokens[source]
    column_scale = add_initializer(graph, f"{base}_column_scale",
                                   np.ascontiguousarray(np.broadcast_to(scale, (codes.shape[1],)), np.float32))
    if int8 == "u8u8":
        weight = add_initializer(graph, f"{base}_u8", _unsigned(codes))
        weight_zero = [add_initializer(graph, f"{base}_b_zero", np.array(128, np.uint8))]
    else:
        weight, weight_zero = add_initializer(graph, f"{base}_int8", codes.astype(np.int8)), []
    product = op("MatMulIntegerToFloat", grid_u8, weight,
                 add_initializer(graph, f"{base}_a_scale", np.array(1.0, np.float32)), column_scale,
                 add_initializer(graph, f"{base}_a_zero", np.array(128, np.uint8)), *weight_zero, domain=MS_DOMAIN)
    replace_node(graph, node, nodes, op("Mul", product, row_scale))
