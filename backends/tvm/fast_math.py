"""Vectorizable transcendental functions: GELU, softmax, exp, erf and tanh as polynomials, not libm calls.

TVM lowers ``erf``, ``exp`` and ``tanh`` on CPU to scalar libm calls, so a GELU or softmax stays
one element at a time however its loops are scheduled (on MiniLM GELU alone took as long as all
the quantized linears). TVM's ``topi.fast_*`` functions are range-reduced polynomial/rational
approximations made of plain arithmetic, which vectorize; their error is a few float32 ULP.
`FastMath` is TVM's ``FastMathTransform`` plus GELU (``0.5 x (1 + erf(x / sqrt 2))``, which
TVM's pass leaves to the libm ``erf``), applied before legalization.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, topi
from tvm.relax.expr_functor import mutator
from tvm.relax.transform.fast_math import FastMathCodeGenerator


def _gelu(x: tvm.te.Tensor) -> tvm.te.Tensor:
    half = tvm.tirx.const(0.5, x.dtype)
    erf = topi.fast_erf(topi.multiply(x, tvm.tirx.const(1 / math.sqrt(2), x.dtype)))
    return topi.multiply(topi.multiply(x, half), topi.add(erf, tvm.tirx.const(1.0, x.dtype)))


@mutator
class _FastMathWithGelu(FastMathCodeGenerator._cls):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if not isinstance(call.op, tvm.ir.Op):  # a call of another function (TVM's pass reads ``op.name``)
            return call
        if call.op.name == "relax.nn.gelu":
            return self.builder_.call_te(_gelu, call.args[0], primfunc_name_hint="gelu")
        return super().visit_call_(call)


@tvm.transform.module_pass(opt_level=0, name="QCompilerFastMath")
def fast_math(module: tvm.IRModule, _context: tvm.transform.PassContext) -> tvm.IRModule:
    rewriter = _FastMathWithGelu(module)
    for var, function in module.functions_items():
        if isinstance(function, relax.Function):
            rewriter.builder_.update_func(var, rewriter.visit_expr(function))
    return rewriter.builder_.get()
