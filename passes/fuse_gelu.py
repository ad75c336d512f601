"""fuse-gelu: erf and tanh GELU subgraphs become one standard `Gelu` node (opset 20).

Exporters spell GELU as ``x * 0.5 * (1 + erf(x / sqrt 2))`` in several operand orders,
and GPT-2 style models use the tanh approximation
``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``. One node makes the FFN region
(linear, GELU, linear) visible to analysis and maps to fused kernels in every runtime.
"""

from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript.rewriter import pattern

from qcompiler.pass_api import Pass, PassContext, PassOutcome
from qcompiler.registry import register

_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _erf_term(op, x):
    """``1 + erf(x / sqrt 2)``, with the division also written as a multiplication."""
    scaled = pattern.OrValue([op.Div(x, _SQRT2), op.Mul(x, 1.0 / _SQRT2)])
    return op.Add(op.Erf(scaled), 1.0)


def _tanh_term(op, x):
    cube = pattern.OrValue([op.Pow(x, 3.0), op.Mul(x, op.Mul(x, x))])
    inner = op.Mul(_SQRT_2_OVER_PI, op.Add(x, op.Mul(0.044715, cube)))
    return op.Add(op.Tanh(inner), 1.0)


# The three ways exporters multiply 0.5, x and the bracketed term; commutation of each
# Mul is covered by the rule set's ``commute=True``.
_PRODUCTS = {
    "x-term-half": lambda op, x, term: op.Mul(op.Mul(x, term), 0.5),
    "x-term*half": lambda op, x, term: op.Mul(x, op.Mul(term, 0.5)),
    "x*half-term": lambda op, x, term: op.Mul(op.Mul(x, 0.5), term),
}


def _rule(kind: str, term, product_name: str, product) -> pattern.RewriteRule:
    approximate = "none" if kind == "erf" else "tanh"
    return pattern.RewriteRule(
        lambda op, x: product(op, x, term(op, x)),
        lambda op, x: op.Gelu(x, approximate=approximate),
        name=f"{kind}-gelu-{product_name}",
    )


_RULES = pattern.RewriteRuleSet(
    [_rule(kind, term, name, product)
     for kind, term in (("erf", _erf_term), ("tanh", _tanh_term))
     for name, product in _PRODUCTS.items()],
    commute=True,
)


@register
class FuseGelu(Pass):
    name = "fuse-gelu"
    summary = "Fuse erf and tanh GELU subgraphs into standard Gelu nodes (opset 20+)."

    def run(self, model: ir.Model, ctx: PassContext) -> PassOutcome:
        count = _RULES.apply_to_model(model)
        return PassOutcome(bool(count), {"gelu": count})
