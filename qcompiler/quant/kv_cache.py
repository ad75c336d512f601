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

Keys carry outlier channels that 4 bits cannot hold; QuaRot rotates queries and keys by
a Hadamard ``H`` on the head dimension, online after RoPE: ``(q H)(k H)^T = q k^T``, and
``k H`` is what gets quantized and cached (``kv_rotate``, on by default). Values need no
online rotation: ``rotate`` rotates them offline per head through v_proj and o_proj.

A model without a cache (an encoder such as MiniLM) has the same K and V tensors: there
``kv=`` quantizes and dequantizes them where attention reads them, which measures what a
cache of that format would do to a real model's attention (nothing is stored).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.linears import is_constant
from qcompiler.decoding import cache_layout, is_cache_input
from qcompiler.errors import QCompilerError
from qcompiler.graph import add_initializer
from qcompiler.hadamard import orthogonal_matrix

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


def quantize_cache(model: ir.Model, kind: str, group: int = 0, rotate_keys: bool = True) -> dict:
    """Store ``model``'s KV cache as ``kind`` codes (or, without a cache, round K and V alike); the report's figures."""
    problem = kind_problem(kind)
    if problem:
        raise QCompilerError(problem[0].upper() + problem[1:] + ".")
    layout = cache_layout(model)
    if layout is not None and layout.quantized:
        raise QCompilerError("The model's KV cache is already quantized.")
    graph = model.graph
    attentions = find_attention(graph)
    if not attentions:
        raise QCompilerError(f"kv={kind} quantizes attention's keys and values, and qcompiler found no attention "
                             "(MatMul of queries and keys into a Softmax, then of its output and values).")
    head_dim = attentions[0].head_dim
    group = group or head_dim
    if head_dim % group or (kind == "int4" and group % 2):
        raise QCompilerError(f"kv_group={group} must divide the head size {head_dim}"
                             f"{' and be even (int4 packs two codes per byte)' if kind == 'int4' else ''}.")
    appends = {id(a) for attention in attentions for a in (attention.keys, attention.values) if isinstance(a, ir.Node)}
    if layout is not None and len(appends) != len(layout.past_names):
        raise QCompilerError(f"qcompiler found {len(appends)} of the {len(layout.past_names)} cache appends on the "
                             "paths of attention's keys and values, and quantizes a cache whole or not at all.")
    fmt = CacheFormat(kind, group)
    rotation = orthogonal_matrix(head_dim) if rotate_keys else None
    for index, attention in enumerate(attentions):
        if rotation is not None:
            _rotate_queries(graph, attention, rotation, f"attention{index}")
        for kind_name, anchor in (("key", attention.keys), ("value", attention.values)):
            turn = rotation if kind_name == "key" else None
            if isinstance(anchor, ir.Node):
                _quantize_append(graph, anchor, fmt, head_dim, turn)
            else:
                _round_in_place(graph, anchor, fmt, head_dim, turn, f"attention{index}.{kind_name}")
    details = {"kv_cache": f"{kind}, asymmetric, per head and token, group {group}"
                           f"{', keys rotated by an online Hadamard' if rotate_keys else ''}"}
    if layout is None:
        details["kv_cache"] += f"; no cache in this model: K and V of {len(attentions)} attentions rounded in place"
        return details
    before = layout.bytes_per_token()
    after = int(round(2 * layout.layers * layout.kv_heads * fmt.bytes_per_head_token(head_dim)))
    details.update({"kv_bytes_per_token": after, "kv_bytes_per_token_float": before, "kv_compression": before / after})
    return details


# --------------------------------------------------------------------------- where attention reads K and V


@dataclass
class Attention:
    """One attention: the score MatMul ``q k^T`` and where its keys and values are (a cache Concat, or a tensor).

    ``keys``/``values`` are the Concat appending new tokens to the past in a decoder, else
    ``(value, reader, index)``: the ``[.., head_dim]`` tensor nearest attention on the K or V
    path and the node input that reads it there.
    """

    scores: ir.Node
    keys: ir.Node | tuple[ir.Value, ir.Node, int]
    values: ir.Node | tuple[ir.Value, ir.Node, int]
    head_dim: int


_PATH_OPS = {"Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze", "Identity", "Cast"}
_SCORE_OPS = {"Add", "Mul", "Div", "Sub", "Where", "Cast"}


def find_attention(graph: ir.Graph) -> list[Attention]:
    found = []
    for node in graph:
        if node.op_type != "MatMul" or len(node.inputs) != 2 or any(is_constant(v) for v in node.inputs):
            continue
        softmax = _downstream(node.outputs[0], _SCORE_OPS, "Softmax")
        if softmax is None:
            continue
        mix = _downstream(softmax.outputs[0], {"Where", "Cast", "Dropout", "IsNaN"}, "MatMul", input_index=0)
        query = node.inputs[0]
        head_dim = query.shape[-1] if query.shape is not None and len(query.shape) == 4 else None
        if mix is None or not isinstance(head_dim, int):
            continue
        keys, values = _anchor(node, 1, head_dim), _anchor(mix, 1, head_dim)
        if keys is not None and values is not None:
            found.append(Attention(node, keys, values, head_dim))
    return found


def _downstream(value: ir.Value, through: set[str], target: str, input_index: int | None = None) -> ir.Node | None:
    """The first ``target`` node reading ``value`` through elementwise ``through`` ops (a few steps)."""
    frontier = [value]
    for _ in range(6):
        following = []
        for current in frontier:
            for use in current.uses():
                if use.node.op_type == target and (input_index is None or use.idx == input_index):
                    return use.node
                if use.node.op_type in through:
                    following.append(use.node.outputs[0])
        frontier = following
    return None


def _anchor(reader: ir.Node, index: int, head_dim: int) -> ir.Node | tuple[ir.Value, ir.Node, int] | None:
    """Walk back from ``reader.inputs[index]`` through layout ops: a cache Concat if there is one, else the
    ``[.., head_dim]`` rank-4 tensor nearest attention."""
    first = None
    for _ in range(12):
        value = reader.inputs[index]
        if first is None and value.shape is not None and len(value.shape) == 4 and value.shape[-1] == head_dim:
            first = (value, reader, index)
        node = value.producer()
        if node is None:
            return first
        if node.op_type == "Concat" and _is_cache_append(node):
            return node
        if node.op_type in _PATH_OPS or (node.op_type in ("Mul", "Div") and is_constant(node.inputs[1])):
            reader, index = node, 0
            continue
        return first
    return first


def _is_cache_append(node: ir.Node) -> bool:
    return any(is_cache_input(v) for v in node.inputs)


# --------------------------------------------------------------------------- rewrites


class _Builder:
    """Nodes of one rewrite, with constants named after ``base``, inserted in order before one node."""

    def __init__(self, graph: ir.Graph, base: str, fmt: CacheFormat, head_dim: int):
        self.graph, self.base, self.fmt, self.head_dim = graph, base, fmt, head_dim
        self.nodes: list[ir.Node] = []
        groups = head_dim // fmt.group
        self.grouped = self.const([0, 0, 0, groups, fmt.group], np.int64, "grouped_shape")
        self.per_group = self.const([0, 0, 0, groups], np.int64, "group_shape")
        self.last = self.const([-1], np.int64, "last_axis")
        self.zero, self.qmax = self.const(0.0, suffix="zero_f"), self.const(float(fmt.qmax), suffix="qmax")

    def op(self, op_type: str, *args: ir.Value, **attributes) -> ir.Value:
        node = ir.node(op_type, list(args), attributes=attributes)
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, values, dtype=np.float32, suffix="c") -> ir.Value:
        return add_initializer(self.graph, f"{self.base}.{suffix}", np.asarray(values, dtype=dtype))

    def quantize(self, x: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
        """``x [.., head_dim]`` -> (uint8 codes ``[.., stored]``, float16 scales and uint8 zeros ``[.., groups]``)."""
        fmt, op = self.fmt, self.op
        x = op("Reshape", x, self.grouped)
        low = op("Min", op("ReduceMin", x, self.last, keepdims=1), self.zero)
        high = op("Max", op("ReduceMax", x, self.last, keepdims=1), self.zero)
        scale16 = op("Cast", op("Max", op("Div", op("Sub", high, low), self.qmax), self.const(1e-8, suffix="tiny")),
                     to=ir.DataType.FLOAT16)
        scale = op("Cast", scale16, to=ir.DataType.FLOAT)  # quantize with the scale as stored
        zero = op("Clip", op("Round", op("Div", op("Neg", low), scale)), self.zero, self.qmax)
        codes = op("Clip", op("Add", op("Round", op("Div", x, scale)), zero), self.zero, self.qmax)
        if fmt.bits == 4:
            pairs = op("Reshape", codes, self.const([0, 0, 0, self.head_dim // 2, 2], np.int64, "pair_shape"))
            lo = op("Slice", pairs, self.const([0], np.int64, "s0"), self.const([1], np.int64, "s1"), self.last)
            hi = op("Slice", pairs, self.const([1], np.int64, "s1b"), self.const([2], np.int64, "s2"), self.last)
            codes = op("Add", lo, op("Mul", hi, self.const(16.0, suffix="sixteen")))
        stored = self.head_dim if fmt.bits == 8 else self.head_dim // 2
        codes = op("Cast", op("Reshape", codes, self.const([0, 0, 0, stored], np.int64, "stored_shape")),
                   to=ir.DataType.UINT8)
        return (codes, op("Reshape", scale16, self.per_group),
                op("Cast", op("Reshape", zero, self.per_group), to=ir.DataType.UINT8))

    def dequantize(self, codes: ir.Value, scales: ir.Value, zeros: ir.Value) -> ir.Value:
        op = self.op
        values = op("Cast", codes, to=ir.DataType.FLOAT)
        if self.fmt.bits == 4:
            high = op("Floor", op("Div", values, self.const(16.0, suffix="sixteen_r")))
            low = op("Sub", values, op("Mul", high, self.const(16.0, suffix="sixteen_m")))
            values = op("Concat", op("Unsqueeze", low, self.last), op("Unsqueeze", high, self.last), axis=-1)
        centred = op("Sub", op("Reshape", values, self.grouped),
                     op("Unsqueeze", op("Cast", zeros, to=ir.DataType.FLOAT), self.last))
        scaled = op("Mul", centred, op("Unsqueeze", op("Cast", scales, to=ir.DataType.FLOAT), self.last))
        return op("Reshape", scaled, self.const([0, 0, 0, self.head_dim], np.int64, "head_shape"))

    def rotate(self, x: ir.Value, rotation: np.ndarray) -> ir.Value:
        return self.op("MatMul", x, self.const(rotation.astype(np.float32), suffix="hadamard"))


def _rotate_queries(graph: ir.Graph, attention: Attention, rotation: np.ndarray, base: str) -> None:
    """``q H`` into the score MatMul (its keys get ``k H`` where they are quantized): the scores are unchanged."""
    scores = attention.scores
    hadamard = add_initializer(graph, f"{base}.query.hadamard", rotation.astype(np.float32))
    rotate = ir.node("MatMul", [scores.inputs[0], hadamard])
    graph.insert_before(scores, rotate)
    scores.replace_input_with(0, rotate.outputs[0])


def _round_in_place(graph: ir.Graph, anchor: tuple[ir.Value, ir.Node, int], fmt: CacheFormat, head_dim: int,
                    rotation: np.ndarray | None, base: str) -> None:
    """No cache: what attention reads at ``anchor`` goes through the cache's quantizer (and rotation)."""
    value, reader, index = anchor
    build = _Builder(graph, base, fmt, head_dim)
    x = build.rotate(value, rotation) if rotation is not None else value
    restored = build.dequantize(*build.quantize(x))
    graph.insert_before(reader, build.nodes)
    reader.replace_input_with(index, restored)


def _quantize_append(graph: ir.Graph, concat: ir.Node, fmt: CacheFormat, head_dim: int,
                     rotation: np.ndarray | None) -> None:
    """The Concat of past and new tokens becomes a Concat of codes, scales and zeros, read back dequantized."""
    past = next(v for v in concat.inputs if v.producer() is None)
    others = [use.node for use in past.uses() if use.node is not concat and not _reads_leading_dims(use.node)]
    if others:
        raise QCompilerError(f"Cache input '{past.name}' is read by something other than the Concat appending the new "
                             "tokens; qcompiler cannot quantize that cache.")
    present = concat.outputs[0]
    new = next(v for v in concat.inputs if v is not past)
    groups = head_dim // fmt.group
    stored = head_dim if fmt.bits == 8 else head_dim // 2
    build = _Builder(graph, past.name, fmt, head_dim)
    codes, scales, zeros = build.quantize(build.rotate(new, rotation) if rotation is not None else new)
    past_scale = _cache_input(graph, past, past.name + SCALE_SUFFIX, ir.DataType.FLOAT16, groups)
    past_zero = _cache_input(graph, past, past.name + ZERO_SUFFIX, ir.DataType.UINT8, groups)
    _retype(past, ir.DataType.UINT8, stored)
    all_codes = build.op("Concat", past, codes, axis=-2)
    all_scales = build.op("Concat", past_scale, scales, axis=-2)
    all_zeros = build.op("Concat", past_zero, zeros, axis=-2)
    restored = build.dequantize(all_codes, all_scales, all_zeros)
    graph.insert_before(concat, build.nodes)

    present_name = present.name
    graph.outputs[list(graph.outputs).index(present)] = all_codes
    present.replace_all_uses_with(restored)
    graph.remove(concat, safe=True)
    all_codes.name = present_name
    for offset, (value, suffix) in enumerate(((all_scales, SCALE_SUFFIX), (all_zeros, ZERO_SUFFIX)), start=1):
        value.name = present_name + suffix
        graph.outputs.insert(list(graph.outputs).index(all_codes) + offset, value)
    _describe(all_codes, past, ir.DataType.UINT8, stored)
    _describe(all_scales, past, ir.DataType.FLOAT16, groups)
    _describe(all_zeros, past, ir.DataType.UINT8, groups)


def _reads_leading_dims(node: ir.Node) -> bool:
    """A Shape of batch, heads or past length only (the exporter's mask arithmetic): the codes keep those dims."""
    if node.op_type != "Shape":
        return False
    start = node.attributes.get("start")
    end = node.attributes.get("end")
    start = start.value if start is not None else 0
    return end is not None and 0 <= start < end.value <= 3


def _cache_input(graph: ir.Graph, like: ir.Value, name: str, dtype: ir.DataType, last: int) -> ir.Value:
    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape([*list(like.shape)[:3], last]))
    graph.inputs.insert(list(graph.inputs).index(like) + (1 if name.endswith(SCALE_SUFFIX) else 2), value)
    return value


def _retype(value: ir.Value, dtype: ir.DataType, last: int) -> None:
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape([*list(value.shape)[:3], last])


def _describe(value: ir.Value, past: ir.Value, dtype: ir.DataType, last: int) -> None:
    """Give a cache output its dtype and ``[batch, heads, past + new, last]`` shape (the past's leading dims)."""
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape([*list(past.shape)[:2], None, last])
