"""KV-cache quantization: a causal LM's cache stored as int8 or int4 codes, written quantized and read dequantized.

Each cache tensor ``[batch, kv_heads, tokens, head_dim]`` is quantized per head and per
token in groups of ``group`` channels along ``head_dim`` (the whole head by default),
asymmetrically, as KIVI and QuaRot store it:

    s = (max(x_g, 0) - min(x_g, 0)) / qmax,   z = round(-min(x_g, 0) / s),   q = clip(round(x / s) + z, 0, qmax)
    x^ = (q - z) s

The new tokens' keys and values are quantized where the graph appends them to the past
(the Concat of ``past_key_values.{i}.*`` and the new tensor), the cache inputs and outputs
of the graph become the codes (uint8; int4 packs two codes per byte along ``head_dim``),
one float16 scale and one uint8 zero point per group (``past_key_values.{i}.key_scale``,
``..._zero``; the same names under ``present.``), and attention reads the dequantized
concatenation. So the memory is really saved, and a prompt and each decode step see the
same rounding: decoding with the cache still equals recomputing the sequence through the
same quantizer. ``kv=fp8`` is refused: ONNX's Concat, which appends to the cache, takes no
float8 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.decoding import cache_layout
from qcompiler.errors import QCompilerError
from qcompiler.graph import add_initializer

KINDS = ("int8", "int4")
SCALE_SUFFIX, ZERO_SUFFIX = "_scale", "_zero"


@dataclass(frozen=True)
class CacheFormat:
    kind: str
    group: int

    @property
    def bits(self) -> int:
        return 8 if self.kind == "int8" else 4

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def bytes_per_head_token(self, head_dim: int) -> float:
        """Bytes one token's head takes: codes, plus a float16 scale and a uint8 zero point per group."""
        return head_dim * self.bits / 8 + (head_dim // self.group) * 3


def kind_problem(kind: str) -> str | None:
    """Why ``kv=kind`` cannot be stored, or None."""
    if kind == "fp8":
        return ("kv=fp8 cannot be stored: ONNX's Concat, which appends new tokens to the cache, takes no float8 "
                "tensors; kv=int8 stores the same bytes per value")
    if kind not in KINDS:
        return f"kv must be one of {', '.join(KINDS)}, not '{kind}'"
    return None


def quantize_cache(model: ir.Model, kind: str, group: int = 0) -> dict:
    """Rewrite every cache append of ``model`` to store ``kind`` codes; returns what the report says."""
    problem = kind_problem(kind)
    if problem:
        raise QCompilerError(problem[0].upper() + problem[1:] + ".")
    layout = cache_layout(model)
    if layout is None:
        raise QCompilerError(f"kv={kind} quantizes a KV cache, and this model has none (no past_key_values inputs).")
    if layout.quantized:
        raise QCompilerError("The model's KV cache is already quantized.")
    group = group or layout.head_dim
    if layout.head_dim % group or (kind == "int4" and group % 2):
        raise QCompilerError(f"kv_group={group} must divide the head size {layout.head_dim}"
                             f"{' and be even (int4 packs two codes per byte)' if kind == 'int4' else ''}.")
    fmt = CacheFormat(kind, group)
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    for name in layout.past_names:
        past = inputs[name]
        appends = [use.node for use in past.uses() if use.node.op_type == "Concat"]
        others = [use.node for use in past.uses() if use.node.op_type != "Concat" and not _reads_leading_dims(use.node)]
        if len(appends) != 1 or others:
            raise QCompilerError(f"Cache input '{name}' is read by something other than one Concat appending the new "
                                 "tokens; qcompiler cannot quantize that cache.")
        _quantize_append(graph, appends[0], past, fmt, layout.head_dim)
    before = layout.bytes_per_token()
    after = int(round(2 * layout.layers * layout.kv_heads * fmt.bytes_per_head_token(layout.head_dim)))
    return {"kv_cache": f"{kind}, asymmetric, per head and token, group {group}", "kv_bytes_per_token": after,
            "kv_bytes_per_token_float": before, "kv_compression": before / after}


def _reads_leading_dims(node: ir.Node) -> bool:
    """A Shape of batch, heads or past length only (the exporter's mask arithmetic): the codes keep those dims."""
    if node.op_type != "Shape":
        return False
    start = node.attributes.get("start")
    end = node.attributes.get("end")
    start = start.value if start is not None else 0
    return end is not None and 0 <= start < end.value <= 3


def _quantize_append(graph: ir.Graph, concat: ir.Node, past: ir.Value, fmt: CacheFormat, head_dim: int) -> None:
    present = concat.outputs[0]
    new = next(v for v in concat.inputs if v is not past)
    groups = head_dim // fmt.group
    stored = head_dim if fmt.bits == 8 else head_dim // 2
    base = past.name
    nodes: list[ir.Node] = []

    def op(op_type: str, *args: ir.Value, **attributes) -> ir.Value:
        node = ir.node(op_type, list(args), attributes=attributes)
        nodes.append(node)
        return node.outputs[0]

    def const(values, dtype=np.float32, suffix="c") -> ir.Value:
        return add_initializer(graph, f"{base}.{suffix}", np.asarray(values, dtype=dtype))

    grouped_shape = const([0, 0, 0, groups, fmt.group], np.int64, "grouped_shape")
    per_group_shape = const([0, 0, 0, groups], np.int64, "group_shape")
    last = const([-1], np.int64, "last_axis")
    zero_f, qmax = const(0.0, suffix="zero_f"), const(float(fmt.qmax), suffix="qmax")

    # Quantize the new tokens.
    x = op("Reshape", new, grouped_shape)
    low = op("Min", op("ReduceMin", x, last, keepdims=1), zero_f)
    high = op("Max", op("ReduceMax", x, last, keepdims=1), zero_f)
    scale16 = op("Cast", op("Max", op("Div", op("Sub", high, low), qmax), const(1e-8, suffix="tiny")),
                 to=ir.DataType.FLOAT16)
    scale = op("Cast", scale16, to=ir.DataType.FLOAT)  # quantize with the scale as stored
    zero = op("Clip", op("Round", op("Div", op("Neg", low), scale)), zero_f, qmax)
    codes = op("Clip", op("Add", op("Round", op("Div", x, scale)), zero), zero_f, qmax)
    if fmt.bits == 4:
        pairs = op("Reshape", codes, const([0, 0, 0, head_dim // 2, 2], np.int64, "pair_shape"))
        lo = op("Slice", pairs, const([0], np.int64, "s0"), const([1], np.int64, "s1"), last)
        hi = op("Slice", pairs, const([1], np.int64, "s1b"), const([2], np.int64, "s2"), last)
        codes = op("Add", lo, op("Mul", hi, const(16.0, suffix="sixteen")))
    codes = op("Cast", op("Reshape", codes, const([0, 0, 0, stored], np.int64, "stored_shape")), to=ir.DataType.UINT8)

    # Append to the past: codes, scales and zero points are the cache.
    past_scale = _cache_input(graph, past, base + SCALE_SUFFIX, ir.DataType.FLOAT16, groups)
    past_zero = _cache_input(graph, past, base + ZERO_SUFFIX, ir.DataType.UINT8, groups)
    _retype(past, ir.DataType.UINT8, stored)
    all_codes = op("Concat", past, codes, axis=-2)
    all_scales = op("Concat", past_scale, op("Reshape", scale16, per_group_shape), axis=-2)
    all_zeros = op("Concat", past_zero, op("Cast", op("Reshape", zero, per_group_shape), to=ir.DataType.UINT8), axis=-2)

    # Read it back dequantized: what attention computed with before, through the quantizer.
    values = op("Cast", all_codes, to=ir.DataType.FLOAT)
    if fmt.bits == 4:
        high_codes = op("Floor", op("Div", values, const(16.0, suffix="sixteen_r")))
        low_codes = op("Sub", values, op("Mul", high_codes, const(16.0, suffix="sixteen_m")))
        values = op("Concat", op("Unsqueeze", low_codes, last), op("Unsqueeze", high_codes, last), axis=-1)
    values = op("Reshape", values, grouped_shape)
    centred = op("Sub", values, op("Unsqueeze", op("Cast", all_zeros, to=ir.DataType.FLOAT), last))
    restored = op("Reshape", op("Mul", centred, op("Unsqueeze", op("Cast", all_scales, to=ir.DataType.FLOAT), last)),
                  const([0, 0, 0, head_dim], np.int64, "head_shape"))
    graph.insert_before(concat, nodes)

    present_name = present.name
    index = list(graph.outputs).index(present)
    graph.outputs[index] = all_codes
    present.replace_all_uses_with(restored)
    graph.remove(concat, safe=True)
    all_codes.name = present_name
    for value, suffix in ((all_scales, SCALE_SUFFIX), (all_zeros, ZERO_SUFFIX)):
        value.name = present_name + suffix
        graph.outputs.insert(list(graph.outputs).index(all_codes) + (1 if suffix == SCALE_SUFFIX else 2), value)
    _describe(all_codes, past, ir.DataType.UINT8, stored)
    _describe(all_scales, past, ir.DataType.FLOAT16, groups)
    _describe(all_zeros, past, ir.DataType.UINT8, groups)


def _cache_input(graph: ir.Graph, like: ir.Value, name: str, dtype: ir.DataType, last: int) -> ir.Value:
    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape([*list(like.shape)[:3], last]))
    graph.inputs.insert(list(graph.inputs).index(like) + (1 if name.endswith(SCALE_SUFFIX) else 2), value)
    return value


def _retype(value: ir.Value, dtype: ir.DataType, last: int) -> None:
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape([*list(value.shape)[:3], last])


def _describe(value: ir.Value, past: ir.Value, dtype: ir.DataType, last: int) -> None:
    """Give a cache output its dtype and ``[batch, heads, past + new, last]`` shape (the past's leading dims)."""
    dims = [*list(past.shape)[:2], None]
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape([*dims, last])

