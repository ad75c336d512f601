"""The registered passes of qcompiler, one module each.

Importing this package registers every pass and preset with `qcompiler.registry`.
"""

from qcompiler.passes import affine, canonical_linear, convert_opset, equalize, fold_norm, fuse_gelu, fuse_norms, quantize, reassemble, rotate, shift, simplify, smooth  # noqa: F401
from qcompiler.registry import register_preset

register_preset(
    "normalize",
    "convert-opset,simplify,fuse-norms,fuse-gelu,canonical-linear,simplify",
    "Canonical form every later pass expects: opset 23, folded constants, fused LayerNorm/RMSNorm/GELU, MatMul+Add linears.",
)
