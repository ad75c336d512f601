"""Lower a quantized model to a TVM Relax module whose quantized linears run qcompiler's TIR kernels.

Two steps, so the float part of the model keeps TVM's own ONNX importer:

1. `fuse_quantized_linears` rewrites the ONNX IR: each quantized linear becomes one node of
   domain ``qcompiler.tvm`` that carries its kernel's packed weights:

   - ``Int4MatMul(x, packed, scale, zero)``: 4-bit weights in groups along K (per channel is one
     group of K), float activations (W4A16).
   - ``W4A8MatMul(x, packed, scale, zero)``: the same weights with int8 per-token
     activations, multiplied in integers by the VNNI kernel (`w4a8_matmul`), which takes
     float x and quantizes it itself. Where the CPU lacks VNNI or the group size is not a
     multiple of 4, W4A8 takes ``Int4MatMul`` on the int8 codes instead (exact small
     integers in float32, so each group's sum is the same integer product; the row scale
     multiplies the result).
   - ``Int8MatMul(x, packed, zcorr, scale[, activation])``: int8 weights with int8 activations,
     static per tensor (``activation`` holds the scale and zero point) or per token: the VNNI
     int8 x int8 -> int32 kernel, which takes float x and quantizes it itself.

   The linears come from the quantize pass's annotations (qcompiler's own models) or, for
   models quantized elsewhere, from ``com.microsoft.MatMulNBits`` and from a MatMul whose
   weight is a constant 4-bit ``DequantizeLinear`` (blocked or per axis). Nothing else
   changes: other annotated layers stay in the simulate form (Q/DQ and float ops) and the
   lowering says why.
2. `to_relax` imports the result with TVM's ONNX frontend plus converters for those ops and
   for the rotate pass's ``qcompiler.Hadamard`` (the Walsh-Hadamard kernel), added for the
   duration of the import only (`qcompiler.backends.tvm.frontend_hook`: TVM 0.27's frontend
   has no public registration hook). With static shapes every kernel is specialized to its M;
   a library for any shape (`generalize`, `qcompiler.backends.tvm.symbolic`) keeps M symbolic
   and picks a kernel variant by M at run time.
"""

from __future__ import annotations

import contextvars
import hashlib
from typing import Callable

import numpy as np
import onnx_ir as ir
import onnxscript
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from qcompiler.backend import Lowering
from qcompiler.backends.tvm import frontend_hook, hadamard, int4_matmul, int8_matmul, symbolic, w4a8_matmul
from qcompiler.errors import QCompilerError
from qcompiler.graph import MS_DOMAIN, add_initializer, drop_unused, replace_node, unique_node_name, value_named
from qcompiler.online_rotation import DOMAIN as HADAMARD_DOMAIN
from qcompiler.online_rotation import OP as HADAMARD_OP
from qcompiler.quant.formats import ELEMENT_FORMATS, unpack
from qcompiler.quant.annotation import LayerAnnotation
from qcompiler.quant.simulate import weight_parts
from qcompiler.quant.spec import broadcast

KERNEL_DOMAIN = "qcompiler.tvm"
INT4, INT8, W4A8 = "Int4MatMul", "Int8MatMul", "W4A8MatMul"
UINT4 = ELEMENT_FORMATS["uint4"]
OPAQUE = 8  # relax.transform's OpPatternKind.kOpaque: never fused with other ops
_KERNEL_SUFFIX = contextvars.ContextVar("kernel_suffix", default="")  # set by to_relax for the converters


# ---------------------------------------------------------------- step 1: ONNX rewrite


def fuse_quantized_linears(model: ir.Model) -> Lowering:
    """Rewrite every quantized linear of ``model`` (in place) into a ``qcompiler.tvm`` kernel node."""
    result = Lowering()
    graph = model.graph
    for node in list(graph):
        annotation = LayerAnnotation.from_node(node)
        if annotation is not None:
            _fuse_annotated(model, node, annotation, result)
        elif node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
            _fuse_matmul_nbits(model, node, result)
        elif node.op_type == "MatMul" and _constant_4bit_weight(node) is not None:
            _fuse_dequantized_matmul(model, node, result)
        elif node.op_type == HADAMARD_OP and node.domain == HADAMARD_DOMAIN:
            result.rotations += 1
    drop_unused(graph)
    return result


def _fuse_annotated(model: ir.Model, node: ir.Node, annotation: LayerAnnotation, result: Lowering) -> None:
    layer, weight, activation = annotation.layer, annotation.weight.spec, annotation.activation
    if node.op_type == "Conv":
        if annotation.weight.native:
            _dequantize_weight(model.graph, node)
        result.simulated[layer] = ("qcompiler has no TVM integer convolution kernel: the kernel's quantized values "
                                   "run in TVM's float conv, its activations as Q/DQ")
        return
    if not annotation.weight.native:
        result.simulated[layer] = f"{weight.describe()} weights are stored dequantized (no integer codes to run on)"
        return
    tokens = activation is not None and activation.int8_per_token
    static = activation is not None and activation.int8_static_tensor
    codes, scale, zero, _ = weight_parts(node)
    if weight.format in ("int4", "uint4") and weight.granularity in ("group", "channel") \
            and (activation is None or tokens):
        x = value_named(model.graph, activation.source) if tokens else node.inputs[0]
        group = weight.group_size if weight.granularity == "group" else codes.shape[0]
        integer = tokens and w4a8_matmul.supports(group) and int8_matmul.has_vnni()
        _emit_int4(model, node, x, codes, scale, zero, group, signed=weight.format == "int4", tokens=tokens,
                   integer=integer)
        result.kernels[layer] = ("TVM W4A8 VNNI matmul (int8 per-token x int4)" if integer
                                 else "TVM int4 matmul (W4A8: int8 per-token codes)" if tokens
                                 else "TVM int4 matmul (W4A16)")
    elif weight.format == "int8" and weight.granularity in ("channel", "tensor") and (tokens or static) \
            and not int8_matmul.has_vnni():
        # The int8 kernel is written for vpdpbusd; LLVM aborts the process on it without AVX-512 VNNI.
        result.simulated[layer] = ("the TVM int8 matmul needs AVX-512 VNNI, which this CPU lacks; "
                                   "runs as Q/DQ and float ops")
    elif weight.format == "int8" and weight.granularity in ("channel", "tensor") and (tokens or static):
        if tokens:
            x, activation_scale, activation_zero = value_named(model.graph, activation.source), None, 0
        else:  # static: the consumer's own Q/DQ pair holds the scale and zero point
            dq = node.inputs[0].producer()
            x = dq.inputs[0].producer().inputs[0]
            activation_scale = float(dq.inputs[1].const_value.numpy())
            zero = dq.inputs[2].const_value if len(dq.inputs) > 2 and dq.inputs[2] else None
            # int8 activations are stored as uint8 codes + 128 (qcompiler.quant.simulate); the kernel takes int8's.
            activation_zero = 0 if zero is None else int(zero.numpy()) - (128 if zero.dtype == ir.DataType.UINT8 else 0)
        _emit_int8(model, node, x, codes, scale, activation_scale, activation_zero)
        result.kernels[layer] = "TVM int8 VNNI matmul (" + ("per-token" if tokens else "static per-tensor") + ")"
    else:
        if weight.format in ("int4", "uint4"):
            _dequantize_weight(model.graph, node)
        spec = weight.describe() + (f" with {activation.spec.describe()} activations" if activation else " weight-only")
        result.simulated[layer] = f"no TVM kernel for {spec}; runs as Q/DQ and float ops"


def _dequantize_weight(graph: ir.Graph, node: ir.Node) -> None:
    """Give a layer without a TVM kernel its DequantizeLinear'd weight as a float32 constant (the same values).

    TVM 0.27's ONNX importer misreads packed 4-bit initializers (``TensorCopyFromBytes:
    size mismatch``), and a float weight is what its float op runs on either way.
    """
    codes, scale, zero, dq = weight_parts(node)
    axis = dq.attributes["axis"].value if "axis" in dq.attributes else 1
    block = dq.attributes["block_size"].value if "block_size" in dq.attributes else 0
    per_axis = None if scale.size == 1 else axis % codes.ndim
    shifted = codes.astype(np.float32)
    if zero is not None:
        shifted = shifted - broadcast(zero.astype(np.float32), codes.shape, per_axis, block)
    values = shifted * broadcast(scale, codes.shape, per_axis, block)
    node.replace_input_with(1, add_initializer(graph, f"{dq.outputs[0].name}_float", values.astype(np.float32)))


def _emit_int4(model: ir.Model, node: ir.Node, x: ir.Value, codes: np.ndarray, scale: np.ndarray,
               zero: np.ndarray | None, group: int, *, signed: bool, tokens: bool, integer: bool = False) -> None:
    """Replace ``node`` by an Int4MatMul, or with ``integer`` a W4A8MatMul, on uint4 codes.

    Signed codes are shifted by 8, which becomes their zero point.
    """
    k, n = codes.shape
    groups = -(-k // group)
    unsigned = (codes.astype(np.int16) + (8 if signed else 0)).astype(np.uint8)
    if zero is None:
        zero_u4 = np.full((groups, n), 8 if signed else 0, np.uint8)
    else:
        zero_u4 = (np.asarray(zero, np.int16).reshape(-1, n) + (8 if signed else 0)).astype(np.uint8)
    scale = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1, n), (groups, n))
    zero_u4 = np.broadcast_to(zero_u4, (groups, n))
    if integer:
        packed = w4a8_matmul.pack_weights(unsigned, scale, zero_u4, group)
        _replace(model, node, W4A8, x, packed, ("packed", "scale", "zero"), k=k, n=n, group=group)
        return
    packed = int4_matmul.pack_weights(unsigned, scale, zero_u4, group)
    _replace(model, node, INT4, x, packed, ("packed", "scale", "zero"), k=k, n=n, group=group, tokens=int(tokens))


def _emit_int8(model: ir.Model, node: ir.Node, x: ir.Value, codes: np.ndarray, scale: np.ndarray,
               activation_scale: float | None, activation_zero: int) -> None:
    """Replace ``node`` by an Int8MatMul: per token, or static with the quantizer as its last input."""
    k, n = codes.shape
    static = None if activation_scale is None else (activation_scale, activation_zero)
    packed = int8_matmul.pack_weights(codes.astype(np.int8), scale, static)
    _replace(model, node, INT8, x, packed, ("packed", "zcorr", "scale") + (() if static is None else ("activation",)),
             k=k, n=n)


def _replace(model: ir.Model, node: ir.Node, op: str, x: ir.Value, packed: dict[str, np.ndarray],
             order: tuple[str, ...], **attributes) -> None:
    graph = model.graph
    base = node.inputs[1].name or node.name
    weights = [add_initializer(graph, f"{base}_{op.lower()}_{name}", packed[name]) for name in order]
    replacement = ir.node(op, [x, *weights], attributes=attributes, domain=KERNEL_DOMAIN,
                          name=unique_node_name(graph, f"{node.name}_{op.lower()}"))
    model.opset_imports.setdefault(KERNEL_DOMAIN, 1)
    replace_node(graph, node, replacement)


def _fuse_matmul_nbits(model: ir.Model, node: ir.Node, result: Lowering) -> None:
    """``MatMulNBits`` (4 bits, constant weights, no g_idx or bias) as an Int4MatMul."""
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    constants = [value.const_value if value is not None else None for value in node.inputs[1:]]
    label = node.name or node.outputs[0].name
    if attrs.get("bits", 4) != 4 or len(node.inputs) > 4 or constants[0] is None or constants[1] is None:
        result.simulated[label] = "MatMulNBits with bits != 4, g_idx, bias or runtime weights has no TVM kernel"
        return
    k, n, block = int(attrs["K"]), int(attrs["N"]), int(attrs["block_size"])
    blocks = -(-k // block)
    codes = unpack(constants[0].numpy().reshape(-1), UINT4, n * blocks * block).reshape(n, blocks * block).T[:k]
    scale = constants[1].numpy().astype(np.float32).reshape(n, blocks).T
    if len(constants) > 2 and constants[2] is not None:
        zero_bytes = constants[2].numpy()
        if zero_bytes.dtype != np.uint8:
            result.simulated[label] = "MatMulNBits with float zero points has no TVM kernel"
            return
        zero = unpack(zero_bytes.reshape(-1), UINT4, n * -(-blocks // 2) * 2).reshape(n, -1)[:, :blocks].T
    else:
        zero = np.full((blocks, n), 8, np.uint8)
    _emit_int4(model, node, node.inputs[0], codes.astype(np.uint8), scale, zero, block, signed=False, tokens=False)
    result.kernels[label] = "TVM int4 matmul (imported MatMulNBits)"


def _constant_4bit_weight(node: ir.Node) -> ir.Node | None:
    """The constant 4-bit DequantizeLinear that is ``node``'s weight, if it is one."""
    dq = node.inputs[1].producer() if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].const_value is None:
        return None
    if dq.inputs[0].const_value.dtype not in (ir.DataType.INT4, ir.DataType.UINT4) or len(dq.inputs[0].shape) != 2:
        return None
    return dq


def _fuse_dequantized_matmul(model: ir.Model, node: ir.Node, result: Lowering) -> None:
    """``MatMul(x, DequantizeLinear(4-bit codes))`` from a model quantized elsewhere, as an Int4MatMul."""
    dq = _constant_4bit_weight(node)
    codes = dq.inputs[0].const_value.numpy()
    k, n = codes.shape
    axis = dq.attributes["axis"].value if "axis" in dq.attributes else 1
    block = dq.attributes["block_size"].value if "block_size" in dq.attributes else 0
    label = node.name or node.outputs[0].name
    scale = dq.inputs[1].const_value.numpy().astype(np.float32)
    zero = dq.inputs[2].const_value.numpy() if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if block and axis in (0, -2):
        group = block
    elif not block and axis in (1, -1):
        group, scale = k, scale.reshape(1, n)
        zero = None if zero is None else zero.reshape(1, n)
    else:
        result.simulated[label] = f"4-bit DequantizeLinear on axis {axis} (block {block}) has no TVM kernel"
        return
    signed = dq.inputs[0].const_value.dtype == ir.DataType.INT4
    _emit_int4(model, node, node.inputs[0], codes, scale, zero, group, signed=signed, tokens=False)
    result.kernels[label] = "TVM int4 matmul (imported 4-bit DequantizeLinear)"


# ---------------------------------------------------------------- step 2: Relax import


def specialize(model: ir.Model, shapes: dict[str, tuple[int, ...]]) -> None:
    """Fix the input shapes and fold what they determine (in place).

    Exported attention masks compute their size at run time (Shape, Range, Expand); TVM's
    importer cannot infer through them, but with static inputs they fold to constants.
    Model-local functions (the Hadamard nodes) are kept, not inlined: they have a kernel.
    """
    inputs = {v.name: v for v in model.graph.inputs if v.name not in model.graph.initializers}
    for name, value in inputs.items():
        if name not in shapes:
            raise QCompilerError(f"The TVM backend needs a static shape for input '{name}'.")
        if len(shapes[name]) != len(value.shape or shapes[name]):
            raise QCompilerError(f"Input '{name}' has rank {len(value.shape)}, but the shape given is {shapes[name]}.")
        value.shape = ir.Shape(list(shapes[name]))
    onnxscript.optimizer.optimize(model, inline=False)


def generalize(model: ir.Model) -> dict[str, list[str | int]]:
    """Name every dynamic input dimension and fold what is static (in place); the inputs' shapes as named.

    For a library that serves any shape: TVM's importer turns each named dimension into one
    symbolic variable (a dimension with the same name in two inputs is the same variable), and
    needs a name for each, so an unnamed one becomes ``{input}_{axis}``.
    """
    shapes = {}
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.shape is None:
            raise QCompilerError(f"Input '{value.name}' has no rank in the model; the TVM backend needs one.")
        dims = [d if isinstance(d, int) else (d.value or f"{value.name}_{axis}") for axis, d in enumerate(value.shape)]
        value.shape = ir.Shape(dims)
        shapes[value.name] = [d if isinstance(d, int) else str(d) for d in dims]
    onnxscript.optimizer.optimize(model, inline=False)
    return shapes


def to_relax(model: ir.Model, shapes: dict[str, tuple[int, ...]] | None, suffix: str = "") -> tvm.IRModule:
    """The Relax module of a fused model, for the static input ``shapes`` (specialized) or symbolic ones (None).

    ``suffix`` is appended to every kernel's name, so that modules built for several shapes
    can be merged into one library without two kernels sharing a name.
    """
    for value in model.graph.initializers.values():  # TVM reads external data relative to the working directory
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)
    proto = ir.serde.serialize_model(model)
    dtypes = {v.name: v.dtype.numpy().name for v in model.graph.inputs if v.name not in model.graph.initializers}
    token = _KERNEL_SUFFIX.set(suffix)
    try:
        with frontend_hook.extra_converters({**symbolic.CONVERTERS, INT4: _Int4Converter, INT8: _Int8Converter,
                                             W4A8: _W4A8Converter, HADAMARD_OP: _HadamardConverter}):
            return onnx_frontend.from_onnx(proto, shape_dict=None if shapes is None else {
                k: list(v) for k, v in shapes.items()}, dtype_dict=dtypes)
    finally:
        _KERNEL_SUFFIX.reset(token)


def _rows(x: relax.Expr, what: str) -> tuple[list, tvm.ir.Expr | int]:
    """The dims of ``x`` and its row count M (their product but the last): a number, or an expression."""
    shape = x.ty.shape
    if not isinstance(shape, relax.ShapeExpr):
        raise QCompilerError(f"The TVM importer lost the shape of the input of {what}; give the inputs fixed shapes "
                             "(--shape) for this model.")
    dims = list(shape.values)
    if all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return [int(d) for d in dims], int(np.prod([int(d) for d in dims[:-1]], dtype=np.int64))
    rows = tvm.tirx.IntImm("int64", 1)
    for d in dims[:-1]:
        rows = rows * d
    return dims, tvm.sym.Analyzer().simplify(rows)


def _kernel_call(bb: relax.BlockBuilder, func: tvm.tirx.PrimFunc, name: str, args: list, shape: list) -> relax.Var:
    """``call_tir`` of ``func``, added once per name (the kernels are specialized to their shapes).

    The kernel is marked opaque and scheduled, so that fusion neither merges it with its
    neighbours nor hands it to the CPU schedule rules: it is already scheduled by hand.
    """
    return bb.emit(relax.call_tir(_add_kernel(bb, func, name + _KERNEL_SUFFIX.get()), args,
                                  relax.TensorType(shape, "float32")))


def _add_kernel(bb: relax.BlockBuilder, func: tvm.tirx.PrimFunc, name: str) -> tvm.ir.GlobalVar:
    module = bb.get()
    if name in [g.name_hint for g in module.get_global_vars()]:
        return module.get_global_var(name)
    return bb.add_func(func.with_attrs({"global_symbol": name, "op_pattern": OPAQUE, "tirx.is_scheduled": True}), name)


# A kernel variant for a symbolic M: the condition on M it runs under (None for the last) and its builder.
Variant = tuple[Callable[[tvm.tirx.Var], tvm.ir.Expr] | None, Callable[[tvm.tirx.Var], tvm.tirx.PrimFunc]]


def _matmul_call(bb: relax.BlockBuilder, name: str, m, k: int, n: int, static: Callable[[], tvm.tirx.PrimFunc],
                 variants: list[Variant], args: list) -> relax.Var:
    """``[M, K] @ W -> [M, N]`` on a kernel: specialized to M when it is a number, else chosen by M at run time.

    A symbolic M gets one kernel per variant (``variants``: a condition on M and a kernel
    builder taking the symbolic M; the last one's condition is None) and a Relax function that
    branches on M between them, so a decode step (M = 1) runs the GEMV tile and a prompt the
    large one, from one library.
    """
    if isinstance(m, int):
        return _kernel_call(bb, static(), f"{name}_{m}x{k}x{n}", args, [m, n])
    name = f"{name}_{k}x{n}_dyn{_KERNEL_SUFFIX.get()}"
    module = bb.get()
    if name not in [g.name_hint for g in module.get_global_vars()]:
        rows = tvm.tirx.Var("m", "int64")
        params = [relax.Var("x", relax.TensorType([rows, k], "float32"))] + [
            relax.Var(f"w{i}", arg.ty) for i, arg in enumerate(args[1:])]
        out = relax.TensorType([rows, n], "float32")
        kernels = [_add_kernel(bb, make(tvm.tirx.Var("m", "int64")), f"{name}_{i}") for i, (_, make) in
                   enumerate(variants)]
        body = relax.call_tir(kernels[-1], params, out)
        for (condition, _), kernel in reversed(list(zip(variants[:-1], kernels[:-1]))):
            body = relax.If(condition(rows), relax.SeqExpr([], relax.call_tir(kernel, params, out)),
                            relax.SeqExpr([], body))
        builder = relax.BlockBuilder()
        with builder.function(name, params, private=True):
            builder.emit_func_output(builder.emit(body))
        bb.add_func(builder.get()[name], name)
    return bb.emit(relax.Call(bb.get().get_global_var(name), args))


def _per_token(bb: relax.BlockBuilder, x: relax.Expr) -> tuple[relax.Expr, relax.Expr]:
    """Symmetric int8 per-token codes of ``x`` (as float) and their row scales ``max|x| / 127``."""
    peak = relax.op.max(relax.op.abs(x), axis=[-1], keepdims=True)
    scale = bb.emit(relax.op.maximum(relax.op.divide(peak, relax.const(127.0)), relax.const(1e-30)))
    codes = relax.op.clip(relax.op.round(relax.op.divide(x, scale)), -128, 127)
    return bb.emit(codes), scale


def _one_row(m):
    return m == 1


def _gemv_rows(m):
    return m < int4_matmul.GEMM_FROM_ROWS


class _Int4Converter(onnx_frontend.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, packed, scale, zero = inputs
        k, n, group, tokens = attr["k"], attr["n"], attr["group"], attr["tokens"]
        dims, m = _rows(x, "an int4 matmul")
        rows = bb.emit(relax.op.reshape(x, (m, k)))
        if tokens:
            rows, row_scale = _per_token(bb, rows)
        variants = [(_one_row, lambda v: int4_matmul.scheduled(v, k, n, group, "gemv", rows=1)),
                    (_gemv_rows, lambda v: int4_matmul.scheduled(v, k, n, group, "gemv")),
                    (None, lambda v: int4_matmul.scheduled(v, k, n, group, "gemm"))]
        y = _matmul_call(bb, f"int4_matmul_g{group}", m, k, n, lambda: int4_matmul.scheduled(m, k, n, group),
                         variants, [rows, packed, scale, zero])
        if tokens:
            y = relax.op.multiply(y, row_scale)
        return relax.op.reshape(y, (*dims[:-1], n))


class _Int8Converter(onnx_frontend.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, *weights = inputs  # packed, zcorr, scale and, for static activations, their quantizer
        k, n, static = attr["k"], attr["n"], len(weights) == 4
        dims, m = _rows(x, "an int8 matmul")
        variants = [(_one_row, lambda v: int8_matmul.kernel(v, k, n, static, rows=1)),
                    (None, lambda v: int8_matmul.kernel(v, k, n, static))]
        y = _matmul_call(bb, "int8_matmul" + "_static" * static, m, k, n, lambda: int8_matmul.kernel(m, k, n, static),
                         variants, [bb.emit(relax.op.reshape(x, (m, k))), *weights])
        return relax.op.reshape(y, (*dims[:-1], n))


class _W4A8Converter(onnx_frontend.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, packed, scale, zero = inputs
        k, n, group = attr["k"], attr["n"], attr["group"]
        dims, m = _rows(x, "a W4A8 matmul")
        variants = [(_one_row, lambda v: w4a8_matmul.kernel(v, k, n, group, rows=1)),
                    (None, lambda v: w4a8_matmul.kernel(v, k, n, group))]
        y = _matmul_call(bb, f"w4a8_matmul_g{group}", m, k, n, lambda: w4a8_matmul.kernel(m, k, n, group), variants,
                         [bb.emit(relax.op.reshape(x, (m, k))), packed, scale, zero])
        return relax.op.reshape(y, (*dims[:-1], n))


class _HadamardConverter(onnx_frontend.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, a_matrix, b_matrix = inputs
        if not all(isinstance(f, tvm.ir.expr.GenericConst) for f in (a_matrix, b_matrix)):
            raise QCompilerError("A qcompiler.Hadamard node has runtime factors; the TVM backend needs constant ones.")
        shape, rows = _rows(x, "an online Hadamard rotation")
        n = int(shape[-1])
        dynamic = not isinstance(rows, int)
        chosen = hadamard.plan(tvm.tirx.Var("m", "int64") if dynamic else rows, a_matrix.value.numpy(),
                               b_matrix.value.numpy())
        factors = [relax.const(np.ascontiguousarray(f, np.float32)) for f in chosen.factors]
        # Same shape, different factors (random rotations, other seeds): one kernel each, named by digest.
        digest = hashlib.sha1(b"".join(f.tobytes() for f in chosen.factors)).hexdigest()[:8]
        label = "dyn" if dynamic else rows
        y = _kernel_call(bb, chosen.func, f"hadamard_{label}x{chosen.a}x{chosen.b}_{chosen.path}_{digest}",
                         [bb.emit(relax.op.reshape(x, (rows, n))), *factors], [rows, n])
        return relax.op.reshape(y, shape)
