"""The simulate form: quantized weights and activations as ONNX that onnxruntime runs.

Weights become ``DequantizeLinear(codes, scale, zero_point)`` with ONNX's per-axis or
blocked layout wherever onnxruntime's CPU kernels take the element type (int8, uint8,
int4, uint4, FP8; MXFP8 with its power-of-two scales stored as float32). Elsewhere (FP4
elements, NVFP4, MXFP4, 2-bit) the weight is stored pre-dequantized: float32 values that
are exactly the grid values times their scales, so the numbers are the deployed ones, and
the quantize pass says so in its report and in the node's annotation.

Activations: static per-tensor integer ranges become a QuantizeLinear/DequantizeLinear pair;
dynamic ranges (per token, per block, per tensor at run time) become the float ops that
compute the scale and round: Round and Clip for integers, Cast through FP8 for FP8
elements, and a three-binade step rounding for E2M1, which has no Cast kernel.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.graph import add_initializer, insert_after_producer, unique_node_name, unique_value_name
from qcompiler.quant.formats import ElementFormat
from qcompiler.quant.spec import E4M3_MAX, QuantizedTensor, QuantSpec, quantize

DEQUANTIZABLE = {"int8", "uint8", "int4", "uint4", "fp8-e4m3", "fp8-e5m2"}
TINY = 1e-30


def weight_is_native(spec: QuantSpec) -> bool:
    """Whether onnxruntime can run this weight as DequantizeLinear (else it is pre-dequantized)."""
    return spec.element.name in DEQUANTIZABLE and spec.scale_kind != "e4m3+tensor"


def stores_codes(quantized: QuantizedTensor, kernel_shape: tuple[int, ...] | None = None) -> bool:
    """Whether the weight is stored as DequantizeLinear codes (else as float32 values on the grid).

    A convolution's kernel (``kernel_shape``) is quantized as its ``[C_in/g * k, C_out]``
    matrix; per-column and per-tensor scales map onto the kernel's axis 0, but groups along
    the flattened patch have no DequantizeLinear layout on a 4-D kernel.
    """
    if not weight_is_native(quantized.spec):
        return False
    return kernel_shape is None or quantized.axis is None or (quantized.axis == 1 and quantized.block == 0)


def dequantized_weight(graph: ir.Graph, quantized: QuantizedTensor, name: str, anchor: ir.Node,
                       kernel_shape: tuple[int, ...] | None = None) -> ir.Value:
    """A value carrying the quantized weight: a DequantizeLinear output, or a float initializer.

    ``quantized`` is in matrix layout ``[K, N]``; ``kernel_shape`` gives a convolution's
    kernel shape to store it in (see `stores_codes`).
    """
    spec = quantized.spec

    def laid_out(matrix: np.ndarray) -> np.ndarray:
        return matrix if kernel_shape is None else np.ascontiguousarray(matrix.T.reshape(kernel_shape))

    if not stores_codes(quantized, kernel_shape):
        return add_initializer(graph, f"{name}_dequantized", laid_out(quantized.dequantize()))
    codes = add_initializer(graph, f"{name}_quantized", laid_out(quantized.codes()))
    scale = add_initializer(graph, f"{name}_scale", np.asarray(quantized.scale, np.float32))
    inputs = [codes, scale]
    if quantized.zero_point is not None:
        inputs.append(add_initializer(graph, f"{name}_zero_point", spec.element.encode(quantized.zero_point)))
    attributes = {}
    if quantized.axis is not None:
        attributes["axis"] = quantized.axis if kernel_shape is None else 0
        if quantized.block:
            attributes["block_size"] = quantized.block
    node = ir.node("DequantizeLinear", inputs, attributes=attributes, name=unique_node_name(graph, f"{name}_dq"))
    # One weight read by several linears is quantized once per reader: each copy needs its own name.
    node.outputs[0].name = unique_value_name(graph, f"{name}_dq")
    node.outputs[0].shape = ir.Shape(kernel_shape or quantized.values.shape)
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph.insert_before(anchor, node)
    return node.outputs[0]


class _Emitter:
    """Builds a chain of nodes and inserts them right after the producer of ``source``."""

    def __init__(self, graph: ir.Graph, source: ir.Value, prefix: str) -> None:
        self.graph, self.source, self.prefix = graph, source, prefix
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
        node = ir.node(op_type, list(inputs), attributes=attributes,
                       name=unique_node_name(self.graph, f"{self.prefix}_{op_type.lower()}_{len(self.nodes)}"))
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, label: str, array) -> ir.Value:
        return add_initializer(self.graph, f"{self.prefix}_{label}", np.asarray(array))

    def scalar(self, label: str, value: float) -> ir.Value:
        return self.const(label, np.array(value, np.float32))

    def commit(self, result: ir.Value) -> ir.Value:
        result.name = unique_value_name(self.graph, f"{self.prefix}_qdq")  # one per activation spec of a source
        result.shape, result.type = self.source.shape, self.source.type
        insert_after_producer(self.graph, self.source, self.nodes)
        return result


def quantized_activation(graph: ir.Graph, source: ir.Value, spec: QuantSpec,
                         bounds: tuple[float, float] | None, channels: int, channel_axis: int = -1) -> ir.Value:
    """A value equal to ``source`` quantized and dequantized under ``spec`` (static ``bounds`` or dynamic).

    Per-token and grouped scales run along ``channels`` on ``channel_axis``: the last axis
    of a linear's input; axis 1 of a convolution's, where a "token" is one pixel's channel
    vector (the input is viewed channels-last for the reduction and moved back after).
    """
    emit = _Emitter(graph, source, source.name or "activation")
    if not spec.dynamic:
        if spec.granularity != "tensor":
            raise ValueError(f"static activation ranges are per tensor; {spec.describe()} must be dynamic")
        return emit.commit(_static(emit, source, spec, bounds))
    x = source
    channels_last = spec.granularity != "tensor" and channel_axis != -1
    if channels_last:
        if source.shape is None:
            raise ValueError(f"the rank of {source.name} is unknown, so its channel axis cannot be moved last")
        rank = len(source.shape)
        order = [0, *range(2, rank), 1]
        x = emit.op("Transpose", x, perm=order)
    grouped = spec.granularity == "group"
    if grouped:
        if channels % spec.group_size:
            raise ValueError(f"activation groups of {spec.group_size} do not divide {channels} channels")
        head = emit.op("Shape", x, start=0, end=-1)
        shape = emit.op("Concat", head, emit.const("groups", np.array([channels // spec.group_size, spec.group_size],
                                                                     np.int64)), axis=0)
        ungrouped, x = x, emit.op("Reshape", x, shape)
    axes = None if spec.granularity == "tensor" else emit.const("axes", np.array([-1], np.int64))
    result = _dynamic(emit, x, spec, axes)
    if grouped:
        result = emit.op("Reshape", result, emit.op("Shape", ungrouped))
    if channels_last:
        result = emit.op("Transpose", result, perm=[0, rank - 1, *range(1, rank - 1)])
    return emit.commit(result)


def per_consumer(graph: ir.Graph, value: ir.Value, count: int) -> list[ir.Value]:
    """``count`` values equal to ``value``: its QuantizeLinear/DequantizeLinear pair copied per consumer.

    onnxruntime fuses a Q/DQ pair into an integer kernel (MatMulIntegerToFloat,
    QLinearMatMul) only when the pair feeds that one node: with one pair shared by
    q/k/v projections it fused one MatMul of the three on MiniLM.
    """
    dequantize = value.producer()
    quantize_node = dequantize.inputs[0].producer() if dequantize is not None else None
    if count <= 1 or dequantize.op_type != "DequantizeLinear" or quantize_node is None \
            or quantize_node.op_type != "QuantizeLinear":
        return [value] * count
    copies = [value]
    for index in range(1, count):
        # Own scale and zero-point initializers too: identical nodes would be merged back by
        # onnxruntime's common-subexpression elimination before its QDQ fusion runs.
        params = [add_initializer(graph, f"{v.name}_{index}", v.const_value.numpy()) for v in quantize_node.inputs[1:]]
        q = ir.node("QuantizeLinear", [quantize_node.inputs[0], *params], attributes=dict(quantize_node.attributes),
                    name=unique_node_name(graph, f"{quantize_node.name}_{index}"))
        dq = ir.node("DequantizeLinear", [q.outputs[0], *params], attributes=dict(dequantize.attributes),
                     name=unique_node_name(graph, f"{dequantize.name}_{index}"))
        q.outputs[0].name = f"{quantize_node.outputs[0].name}_{index}"
        q.outputs[0].shape, q.outputs[0].type = quantize_node.outputs[0].shape, quantize_node.outputs[0].type
        dq.outputs[0].name = f"{value.name}_{index}"
        dq.outputs[0].shape, dq.outputs[0].type = value.shape, value.type
        graph.insert_after(dequantize, [q, dq])
        copies.append(dq.outputs[0])
    return copies


def _static(emit: _Emitter, x: ir.Value, spec: QuantSpec, bounds: tuple[float, float]) -> ir.Value:
    lo, hi = bounds
    fitted = quantize(np.array([lo, hi], np.float32), spec, "activation", bounds=(np.float32(lo), np.float32(hi)))
    fmt = spec.element
    scale = emit.scalar("scale", float(fitted.scale))
    if fmt.kind == "float":
        # onnxruntime 1.32's extended graph optimizations miscompute float8 Q/DQ pairs on
        # activations (OPT's relative error jumps from 4e-2 to 0.5); the Cast form is the
        # same arithmetic (divide, round-to-nearest-even with saturation, multiply).
        return _scaled_round(emit, x, scale, fmt)
    zero = 0.0 if fitted.zero_point is None else float(fitted.zero_point)
    if fmt.name == "int8":
        # The same grid as uint8 codes + 128 (zero point z + 128): onnxruntime 1.32 rewrites int8
        # activation pairs to uint8 itself and, where it also turns a static 3-D MatMul + Add into
        # a Gemm, leaves a QuantizeLinear whose output_dtype (int8) contradicts its new zero point.
        zero_point = emit.const("zero_point", np.array(zero + 128, np.float32).astype(np.uint8))
    else:
        zero_point = emit.const("zero_point", fmt.encode(np.array(zero, np.float32)))
    return emit.op("DequantizeLinear", emit.op("QuantizeLinear", x, scale, zero_point), scale, zero_point)


def _dynamic(emit: _Emitter, x: ir.Value, spec: QuantSpec, axes: ir.Value | None) -> ir.Value:
    fmt = spec.element

    def reduce(op: str, value: ir.Value) -> ir.Value:
        return emit.op(op, value, axes, keepdims=1) if axes is not None else emit.op(op, value, keepdims=1)

    if fmt.kind == "int" and not spec.symmetric:
        lo = emit.op("Min", reduce("ReduceMin", x), emit.scalar("zero", 0.0))
        hi = emit.op("Max", reduce("ReduceMax", x), emit.scalar("zero_hi", 0.0))
        scale = emit.op("Max", emit.op("Div", emit.op("Sub", hi, lo), emit.scalar("levels", fmt.qmax - fmt.qmin)),
                        emit.scalar("tiny", TINY))
        zero = emit.op("Round", emit.op("Sub", emit.scalar("qmin", fmt.qmin), emit.op("Div", lo, scale)))
        grid = emit.op("Clip", emit.op("Add", emit.op("Round", emit.op("Div", x, scale)), zero),
                       emit.scalar("lowest", fmt.qmin), emit.scalar("highest", fmt.qmax))
        return emit.op("Mul", emit.op("Sub", grid, zero), scale)
    amax = reduce("ReduceMax", emit.op("Abs", x))
    if spec.scale_kind == "e8m0":
        scale = _power_of_two_floor(emit, emit.op("Div", amax, emit.scalar("elem_max", 2.0**fmt.exponent_max)))
    elif spec.scale_kind == "e4m3+tensor":
        tensor = emit.op("Max", emit.op("Div", emit.op("ReduceMax", emit.op("Abs", x), keepdims=1),
                                        emit.scalar("nv_range", fmt.max_value * E4M3_MAX)), emit.scalar("tiny", TINY))
        block = emit.op("Div", emit.op("Div", amax, emit.scalar("elem_max", fmt.max_value)), tensor)
        block = emit.op("Cast", emit.op("Cast", block, to=ir.DataType.FLOAT8E4M3FN), to=ir.DataType.FLOAT)
        scale = emit.op("Max", emit.op("Mul", block, tensor), emit.scalar("tiny_block", TINY))
    else:
        scale = emit.op("Max", emit.op("Div", amax, emit.scalar("elem_max", fmt.max_value)), emit.scalar("tiny", TINY))
    return _scaled_round(emit, x, scale, fmt)


def _scaled_round(emit: _Emitter, x: ir.Value, scale: ir.Value, fmt: ElementFormat) -> ir.Value:
    """``round_fmt(x / scale) * scale`` with float ops."""
    y = emit.op("Div", x, scale)
    if fmt.kind == "int":
        grid = emit.op("Clip", emit.op("Round", y), emit.scalar("lowest", fmt.qmin), emit.scalar("highest", fmt.qmax))
    elif fmt.name == "fp4-e2m1":
        grid = _round_e2m1(emit, y)
    else:
        grid = emit.op("Cast", emit.op("Cast", y, to=fmt.onnx_type, saturate=1), to=ir.DataType.FLOAT)
    return emit.op("Mul", grid, scale)


def _round_e2m1(emit: _Emitter, y: ir.Value) -> ir.Value:
    """Round to E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6) half-to-even: a step of 0.5, 1 or 2 by binade."""
    magnitude = emit.op("Abs", y)
    step = emit.op("Where", emit.op("Less", magnitude, emit.scalar("two", 2.0)), emit.scalar("half", 0.5),
                   emit.op("Where", emit.op("Less", magnitude, emit.scalar("four", 4.0)), emit.scalar("one", 1.0),
                           emit.scalar("step_two", 2.0)))
    rounded = emit.op("Min", emit.op("Mul", emit.op("Round", emit.op("Div", magnitude, step)), step),
                      emit.scalar("six", 6.0))
    return emit.op("Mul", rounded, emit.op("Sign", y))


def _power_of_two_floor(emit: _Emitter, value: ir.Value) -> ir.Value:
    """``2^floor(log2 v)`` exactly: the float estimate corrected by one binade either way."""
    safe = emit.op("Max", value, emit.scalar("smallest", 2.0**-127))
    estimate = emit.op("Pow", emit.scalar("base", 2.0),
                       emit.op("Floor", emit.op("Div", emit.op("Log", safe), emit.scalar("ln2", np.log(2.0)))))
    estimate = emit.op("Where", emit.op("Greater", estimate, safe), emit.op("Div", estimate, emit.scalar("two", 2.0)),
                       estimate)
    doubled = emit.op("Mul", estimate, emit.scalar("double", 2.0))
    return emit.op("Where", emit.op("LessOrEqual", doubled, safe), doubled, estimate)


def weight_parts(node: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, ir.Node]:
    """Codes, scale and zero point of the DequantizeLinear feeding linear ``node``'s weight (the simulate form)."""
    dq = node.inputs[1].producer()
    codes = dq.inputs[0].const_value.numpy()
    scale = dq.inputs[1].const_value.numpy().astype(np.float32)
    zero = dq.inputs[2].const_value.numpy() if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    return codes, scale, zero, dq
