"""Symbolic shapes through TVM's ONNX importer: one library for any batch, sequence and past length.

A graph imported without fixed input shapes keeps its dimensions as TIR variables
(``batch``, ``sequence``, ``past_sequence``...). TVM 0.27's importer loses them in two places
that every exported transformer reaches, after which a tensor's shape is unknown and the
next ``Reshape(..., -1)`` fails:

- ``Range`` with a symbolic limit (the positions and causal masks of exports): TVM computes
  the length through a tensor and names it a fresh variable (``range_len``), so
  ``arange(sequence)`` no longer broadcasts with tensors of length ``sequence``.
  `Range` returns ``arange(start, limit, step)`` on the limit's own expression.
- ``Reshape`` with one ``-1``: TVM infers it as ``prod(input) // prod(known)``, which
  its simplifier leaves as ``batch * (p + s) * 64 // ((p + s) * 16)`` (grouped-query
  attention's head repetition), and TIR lowering then fails on the expression. `Reshape`
  cancels the factors the two sides share (``batch * 4``). It also takes a shape value
  (``Reshape`` of a scalar size to ``[1]``), which TVM's converter refuses.

Both return TVM's own conversion where their case does not apply. `keep_shape_tensors_apart`
is the third fix, in the build pipeline: FuseTIR fails (``RenewDefs``: a variable defined
twice) on a fused group in which ``shape_to_tensor`` takes symbolic sizes as arguments, so
those functions are never fused.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend

OPAQUE = 8  # relax.transform's OpPatternKind.kOpaque


def _dtype(value: tvm.ir.Expr) -> str:
    return str(getattr(value, "dtype", None) or value.ty)


def _scalar(value) -> tvm.ir.Expr | None:
    """The integer expression a scalar input stands for (a symbolic size or a one-element constant)."""
    if tvm.ir.is_prim_expr(value):
        return value
    if isinstance(value, tvm.ir.GenericConst) and value.value.numpy().size == 1:
        item = value.value.numpy().item()
        if isinstance(item, (int, np.integer)):
            return tirx.IntImm("int64", int(item))
    return None


class Range(onnx_frontend.OnnxOpConverter):
    """``Range(start, limit, step)`` with constant start and step and a symbolic limit, kept symbolic."""

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        start, limit, step = (_scalar(onnx_frontend.get_constant(value, params)) for value in inputs)
        if isinstance(start, tirx.IntImm) and isinstance(step, tirx.IntImm) and limit is not None \
                and not isinstance(limit, tirx.IntImm) and "int" in _dtype(limit):
            dtype = str(inputs[0].ty.dtype)
            return relax.op.arange(start, limit if _dtype(limit) == "int64" else tirx.Cast("int64", limit), step, dtype)
        return onnx_frontend.Range._impl_v12(bb, inputs, attr, params)


class Reshape(onnx_frontend.OnnxOpConverter):
    """``Reshape`` whose ``-1`` is inferred by cancelling common factors, and of symbolic sizes."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, shape = inputs[0], onnx_frontend.get_constant(inputs[1], params)
        target = _target_shape(shape)
        if tvm.ir.is_prim_expr(data) and target is not None and len(target) <= 1:
            return relax.ShapeExpr([data]) if target else data
        data_shape = getattr(getattr(data, "ty", None), "shape", None)
        if target is not None and not attr.get("allowzero", 0) and isinstance(data_shape, relax.ShapeExpr):
            dims = list(data_shape.values)
            target = [dims[i] if _is(value, 0) else value for i, value in enumerate(target)]
            holes = [i for i, value in enumerate(target) if _is(value, -1)]
            if len(holes) == 1 and not all(isinstance(d, tirx.IntImm) for d in dims):
                inferred = infer_dimension(dims, [d for i, d in enumerate(target) if i != holes[0]])
                if inferred is not None:
                    target[holes[0]] = inferred
                    return relax.op.reshape(data, target)
        return onnx_frontend.Reshape._impl_v13(bb, inputs, attr, params)


def _is(value: tvm.ir.Expr, number: int) -> bool:
    return isinstance(value, tirx.IntImm) and int(value) == number


def _target_shape(shape) -> list[tvm.ir.Expr] | None:
    if isinstance(shape, tvm.ir.GenericConst):
        return [tirx.IntImm("int64", int(v)) for v in shape.value.numpy().reshape(-1)]
    if isinstance(shape, relax.ShapeExpr):
        return list(shape.values)
    return None


def _factors(value: tvm.ir.Expr) -> list[tvm.ir.Expr]:
    if isinstance(value, tirx.Mul):
        return _factors(value.a) + _factors(value.b)
    return [value]


def infer_dimension(dims: list[tvm.ir.Expr], known: list[tvm.ir.Expr]) -> tvm.ir.Expr | None:
    """``prod(dims) / prod(known)`` as a product of what is left after cancelling, or None if it does not divide."""
    analyzer = tvm.sym.Analyzer()
    numerator = [factor for d in dims for factor in _factors(analyzer.simplify(d))]
    divisor = 1
    for d in known:
        for factor in _factors(analyzer.simplify(d)):
            if isinstance(factor, tirx.IntImm):
                divisor *= int(factor)
                continue
            match = next((i for i, other in enumerate(numerator) if analyzer.can_prove_equal(factor, other)), None)
            if match is None:
                return None
            numerator.pop(match)
    constant = int(np.prod([int(f) for f in numerator if isinstance(f, tirx.IntImm)], dtype=np.int64))
    if constant % divisor:
        return None
    result = tirx.IntImm("int64", constant // divisor)
    for factor in numerator:
        if not isinstance(factor, tirx.IntImm):
            result = result * factor
    return analyzer.simplify(result)


CONVERTERS = {"Range": Range, "Reshape": Reshape}


@tvm.transform.module_pass(opt_level=0, name="QCompilerKeepShapeTensorsApart")
def keep_shape_tensors_apart(module: tvm.IRModule, _context: tvm.transform.PassContext) -> tvm.IRModule:
    """Mark ``shape_to_tensor`` functions opaque, so FuseOps leaves them out of fused groups (see the module doc)."""
    for var, function in list(module.functions_items()):
        if isinstance(function, tirx.PrimFunc) and var.name_hint.startswith("shape_to_tensor"):
            module[var] = function.with_attr("op_pattern", OPAQUE)
    return module
