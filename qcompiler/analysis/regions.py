"""Regions: an activation, the producer that can absorb a channel transform, and its linear sinks.

A pass that makes linears read ``x' = (x - z) T`` instead of ``x`` rewrites every sink
(``W' = T^-1 W``, ``b' = b + z W``) and must make ``x'`` appear, best by changing what
produces ``x``. A region groups those pieces. It is found by walking back from each
linear's input through ops that only move channels around (Reshape, Transpose,
Unsqueeze, Squeeze, Expand, Identity, Dropout, Gather on a token axis), through
attention's ``P @ V`` (linear in ``V``), through a KV cache's Concat of past and new
tokens (the past was written by the same producer, so it is transformed alike), through ReLU (commutes with positive scales) and
through a gated product ``act(gate) * up`` (commutes with a per-channel scale of ``up``),
to the first node that is none of these: the producer. An online ``qcompiler.Hadamard``
node (inserted by rotate where no producer can absorb a rotation) is a producer too: it
cannot absorb anything itself, but per-channel ``y * m + c`` right after it (one Mul and
one Add by constant vectors, created on demand and rewritten in place by later passes)
can absorb any scale and shift, so smooth and shift see through the rotation at the cost
of one elementwise op online. The map from sink channels to
producer channels is obtained by replaying that path on an index probe, not assumed
from names or head counts, so grouped-query attention and token selection come out
right. Nothing here depends on layer names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.linears import Linear, constant_array, find_linears, is_constant
from qcompiler.decoding import is_cache_input
from qcompiler.online_rotation import DOMAIN as HADAMARD_DOMAIN
from qcompiler.online_rotation import OP as HADAMARD_OP

SCALE, SHIFT, ROTATE = "scale", "shift", "rotate"
CAPABILITIES = (SCALE, SHIFT, ROTATE)
ONLINE_ROTATION = "online-rotation"

_LAYOUT_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity", "Dropout", "Gather"}


@dataclass
class Sink:
    """A linear reading the region; its input channel ``j`` carries producer channel ``channel_map[j]``."""

    linear: Linear
    channel_map: np.ndarray


@dataclass
class OnlineAffine:
    """An online Hadamard node and the per-channel ``y * m + c`` after it (``mul``, ``add``: absent until needed)."""

    hadamard: ir.Node
    mul: ir.Node | None = None
    add: ir.Node | None = None

    @property
    def output(self) -> ir.Value:
        """What the sinks read: the last of Hadamard, Mul, Add."""
        return (self.add or self.mul or self.hadamard).outputs[0]


@dataclass
class Region:
    """One absorbable (or not) activation and everything a channel transform of it touches.

    ``kind`` is the producer's class: ``layernorm``, ``rmsnorm``, ``linear``,
    ``attention`` (v_proj to o_proj), ``gated`` (up_proj in ``act(gate) * up``),
    ``online-rotation`` (a ``qcompiler.Hadamard`` node, ``online`` holds it and the
    elementwise ops after it) or ``unabsorbable``. ``capabilities`` are the transforms
    the producer can absorb; ``refused`` says, per transform, why it cannot. ``foreign``
    lists uses of ``source`` outside the region (``None`` for a graph output): an
    elementwise transform there is undone by a compensating node.
    """

    kind: str
    source: ir.Value
    producer: ir.Node | None
    absorber: Linear | None
    sinks: list[Sink]
    path: list[tuple[ir.Node, ir.Value]]
    foreign: list[ir.Node | None]
    capabilities: frozenset[str]
    refused: dict[str, str]
    head_dim: int | None = None
    online: OnlineAffine | None = None

    @property
    def name(self) -> str:
        return self.source.name or "?"

    @property
    def channels(self) -> int:
        return int(self.source.shape[-1])

    @property
    def producer_label(self) -> str:
        if self.producer is None:
            return "graph input"
        if self.absorber is not None:
            return f"{self.absorber.name} ({self.kind})"
        if self.online is not None:
            return f"{self.online.hadamard.name} (online Hadamard)"
        return f"{self.producer.name or self.producer.op_type} ({self.producer.op_type})"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def absorbs_scale_of(self, value: ir.Value) -> bool:
        """A per-channel scale of ``value`` folds into the producer: every sink reads ``value`` channel for channel."""
        return (self.can(SCALE) and self.online is None and self.sinks[0].linear.in_features == self.channels
                and all(s.linear.input is value and np.array_equal(s.channel_map, np.arange(self.channels))
                        for s in self.sinks))


@dataclass
class RegionAnalysis:
    regions: list[Region] = field(default_factory=list)

    def of_kind(self, *kinds: str) -> list[Region]:
        return [r for r in self.regions if r.kind in kinds]

    def able(self, capability: str) -> list[Region]:
        return [r for r in self.regions if r.can(capability)]


@dataclass
class _Walk:
    source: ir.Value
    chain: list[tuple[ir.Node, ir.Value]]  # (node, output used), from the sink's side to the source's side
    tags: set[str]
    head_dim: int | None


def find_regions(graph: ir.Graph) -> RegionAnalysis:
    """Every region of a normalized graph, with its producer class and capabilities."""
    linears = find_linears(graph)
    by_output = {}
    for linear in linears:
        by_output[linear.output] = linear
    walks: dict[int, tuple[_Walk, list[tuple[Linear, _Walk]]]] = {}
    for linear in linears:
        walk = _walk_back(linear.input, by_output)
        walks.setdefault(id(walk.source), (walk, []))[1].append((linear, walk))
    regions = [_build_region(first.source, members, by_output) for first, members in walks.values()]
    return RegionAnalysis(regions)


def _walk_back(value: ir.Value, by_output: dict[ir.Value, Linear]) -> _Walk:
    chain: list[tuple[ir.Node, ir.Value]] = []
    tags: set[str] = set()
    head_dim = None
    while True:
        if value in by_output:
            break
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            break
        op, output = node.op_type, value
        if op in _LAYOUT_OPS and not is_constant(node.inputs[0]):
            if op == "Gather" and not _token_gather(node):
                break
            chain.append((node, output))
            value = node.inputs[0]
        elif op == "Split" and _split_on_last_axis(node):
            chain.append((node, output))
            value = node.inputs[0]
        elif op == "MatMul" and len(node.inputs) == 2 and not any(is_constant(v) for v in node.inputs):
            # softmax(Q K^T) @ V: every output channel is a mix of the same channel of V over tokens.
            tags.add("attention")
            chain.append((node, output))
            value = node.inputs[1]
            head_dim = _last_dim(value)
        elif op == "Concat" and _cache_concat(node):
            # the KV cache: past tokens (a graph input the same transformed producer wrote) before the new ones
            tags.add("cache")
            chain.append((node, output))
            value = next(v for v in node.inputs if not is_cache_input(v))
        elif op == "Relu":
            tags.add("relu")
            chain.append((node, output))
            value = node.inputs[0]
        elif op == "Mul" and len(node.inputs) == 2 and not any(is_constant(v) for v in node.inputs):
            factor = next((v for v in reversed(node.inputs) if v in by_output), None)
            if factor is None:
                break
            tags.add("gated")
            chain.append((node, output))
            value = factor
            break
        else:
            break
    return _Walk(value, chain, tags, head_dim)


def _token_gather(node: ir.Node) -> bool:
    """Gather picking tokens (constant indices on an axis other than the channel axis)."""
    data, indices = node.inputs[0], node.inputs[1]
    if constant_array(indices) is None or data.shape is None:
        return False
    axis = node.attributes.get("axis")
    axis = axis.value if axis is not None else 0
    return axis % len(data.shape) != len(data.shape) - 1


def _cache_concat(node: ir.Node) -> bool:
    """Concat of a ``past_key_values.*`` input and one computed tensor along a token axis (not the channels).

    The past was written by the same producer in an earlier step, so a channel transform of
    the producer transforms the whole cache alike, and the ``present`` output it feeds is the
    region's own state, not a foreign reader.
    """
    computed = [v for v in node.inputs if not is_cache_input(v)]
    if len(computed) != 1 or len(node.inputs) < 2 or computed[0] is None or computed[0].shape is None:
        return False
    axis = node.attributes.get("axis")
    return axis is not None and axis.value % len(computed[0].shape) != len(computed[0].shape) - 1


def _split_on_last_axis(node: ir.Node) -> bool:
    """Split along channels (GPT-2's fused q|k|v): each output is a channel range of the input."""
    data = node.inputs[0]
    axis = node.attributes.get("axis")
    axis = axis.value if axis is not None else 0
    return data.shape is not None and axis % len(data.shape) == len(data.shape) - 1 and all(
        o.shape is not None and isinstance(o.shape[-1], int) for o in node.outputs)


def _last_dim(value: ir.Value) -> int | None:
    if value.shape is None or not isinstance(value.shape[-1], int):
        return None
    return int(value.shape[-1])


def _build_region(source: ir.Value, members: list[tuple[Linear, _Walk]], by_output: dict) -> Region:
    tags = set().union(*(w.tags for _, w in members))
    path = _ordered_path(members)
    producer = source.producer()
    absorber = by_output.get(source)
    online = _online_affine(producer) if absorber is None else None
    kind, refused = _classify(source, producer, absorber, tags, online)
    sinks, probe_error, probed_head_dim = _probe_sinks(source, members)
    # The head size from V's shape, or (shapes left symbolic by the exporter) from the probe's replay.
    head_dim = next((w.head_dim for _, w in members if w.head_dim), probed_head_dim)
    foreign, foreign_inside = _foreign_uses(source, path, [l for l, _ in members])

    if "relu" in tags:
        for c in (SHIFT, ROTATE):
            refused.setdefault(c, "ReLU on the path commutes only with positive per-channel scales")
    if probe_error:
        refused = {c: probe_error for c in CAPABILITIES}
    elif foreign_inside:
        refused = {c: foreign_inside for c in CAPABILITIES}
    else:
        if foreign and ROTATE not in refused:
            refused[ROTATE] = f"{_describe_foreign(source, foreign)}; undoing a rotation there would cost a dense matmul"
        if ROTATE not in refused:
            reason = _rotation_layout_problem(kind, sinks, source, head_dim)
            if reason:
                refused[ROTATE] = reason
    capabilities = frozenset(c for c in CAPABILITIES if c not in refused)
    return Region(kind, source, producer, absorber, sinks, path, foreign, capabilities, refused, head_dim, online)


def _classify(source: ir.Value, producer: ir.Node | None, absorber: Linear | None,
              tags: set[str], online: OnlineAffine | None) -> tuple[str, dict[str, str]]:
    if absorber is not None:
        if "gated" in tags:
            reason = "a gated product act(gate) * up commutes only with per-channel scales"
            return "gated", {SHIFT: reason, ROTATE: reason}
        if "attention" in tags:
            return "attention", {SHIFT: "a shift does not pass exactly through masked attention"}
        return "linear", {}
    if producer is None:
        reason = "producer is a graph input" if not is_constant(source) else "the linear reads a constant"
        return "unabsorbable", {c: reason for c in CAPABILITIES}
    if online is not None:
        return ONLINE_ROTATION, {ROTATE: "already rotated online by a qcompiler.Hadamard node"}
    op = producer.op_type
    if op == "LayerNormalization" and is_constant(producer.inputs[1]) and _norm_on_last_axis(producer):
        return "layernorm", {ROTATE: "LayerNorm does not commute with a rotation (rotate makes it an RMSNorm and "
                                     "rotates it with the residual stream when the stream allows)"}
    if op == "RMSNormalization" and is_constant(producer.inputs[1]) and _norm_on_last_axis(producer):
        return "rmsnorm", {SHIFT: "RMSNorm has no bias to absorb a shift",
                           ROTATE: "RMSNorm absorbs a rotation only through the residual stream rotation "
                                   "(see the residual streams)"}
    reason = f"producer {op} is not linear in its output channels"
    if op == "Mul":
        reason = "producer is a product of two activations"
    return "unabsorbable", {c: reason for c in CAPABILITIES}


def _online_affine(node: ir.Node | None) -> OnlineAffine | None:
    """The Hadamard node behind ``node`` through at most an Add, then a Mul, by per-channel constants."""
    add = mul = None
    if _per_channel_op(node, "Add"):
        add, node = node, _sole_producer(node.inputs[0])
    if _per_channel_op(node, "Mul"):
        mul, node = node, _sole_producer(node.inputs[0])
    if node is None or (node.domain, node.op_type) != (HADAMARD_DOMAIN, HADAMARD_OP):
        return None
    return OnlineAffine(node, mul, add)


def _per_channel_op(node: ir.Node | None, op: str) -> bool:
    """``op(x, v)`` with ``v`` a constant vector of ``x``'s channel count."""
    if node is None or node.op_type != op or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    vector = constant_array(node.inputs[1])
    return (vector is not None and vector.ndim == 1 and not is_constant(node.inputs[0])
            and _last_dim(node.inputs[0]) == vector.shape[0])


def _sole_producer(value: ir.Value) -> ir.Node | None:
    """The producer of a value nothing else reads (so rewriting what follows it changes no one else)."""
    if len(value.uses()) != 1 or value.is_graph_output():
        return None
    return value.producer()


def _norm_on_last_axis(node: ir.Node) -> bool:
    axis = node.attributes.get("axis")
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    value = axis.value if axis is not None else -1
    return value == -1 or (rank is not None and value == rank - 1)


def _ordered_path(members: list[tuple[Linear, _Walk]]) -> list[tuple[ir.Node, ir.Value]]:
    seen: dict[int, tuple[ir.Node, ir.Value]] = {}
    for _, walk in members:
        for step in reversed(walk.chain):
            seen.setdefault(id(step[1]), step)
    return list(seen.values())


def _foreign_uses(source: ir.Value, path: list[tuple[ir.Node, ir.Value]], sinks: list[Linear]) -> tuple[list, str | None]:
    """Readers of the source outside the region, and a reason if an inner path value has any.

    Only the output a path step uses counts: the other outputs of a channel Split carry
    channels the region leaves untouched. A ``Shape`` reader does not count either: it reads
    the shape (the legacy exporter's run-time Reshape targets), which no channel
    transform changes.
    """
    inside = {id(n) for n, _ in path} | {id(l.matmul) for l in sinks}

    def outside(value: ir.Value) -> list[ir.Node]:
        return [use.node for use in value.uses() if id(use.node) not in inside and use.node.op_type != "Shape"]

    foreign: list[ir.Node | None] = list(outside(source))
    if source.is_graph_output():
        foreign.append(None)
    for node, value in path:
        readers = outside(value)
        cache_state = node.op_type == "Concat" and _cache_concat(node)
        if readers or (value.is_graph_output() and not cache_state):
            reader = readers[0].op_type if readers else "a graph output"
            return foreign, f"path value '{value.name}' is also read by {reader} outside the region"
    return foreign, None


def _describe_foreign(source: ir.Value, foreign: list[ir.Node | None]) -> str:
    names = ["graph output" if n is None else (n.name or n.op_type) for n in foreign]
    return f"'{source.name}' is also read outside the region ({', '.join(names)})"


def _rotation_layout_problem(kind: str, sinks: list[Sink], source: ir.Value, head_dim: int | None) -> str | None:
    channels = int(source.shape[-1])
    if kind == "attention":
        if not head_dim:
            return "the attention head size is unknown"
        for sink in sinks:
            heads = sink.channel_map.reshape(-1, head_dim)
            if np.any(heads - heads[:, :1] != np.arange(head_dim)) or np.any(heads[:, 0] % head_dim):
                return "attention heads do not map whole heads from v_proj to o_proj"
        return None
    for sink in sinks:
        if sink.channel_map.shape != (channels,) or np.any(sink.channel_map != np.arange(channels)):
            return "the path permutes or selects channels"
    return None


# --- the index probe -------------------------------------------------------------------------------


def _probe_sinks(source: ir.Value, members: list[tuple[Linear, _Walk]]) -> tuple[list[Sink], str | None, int | None]:
    """Replay each sink's path on an array holding channel numbers: its channel map, and V's head size if any."""
    sinks, head_dim = [], None
    for linear, walk in members:
        try:
            channel_map, head_dim = _probe(source, list(reversed(walk.chain)), head_dim)
        except (_ProbeError, ValueError) as error:
            return [Sink(l, np.arange(l.in_features)) for l, _ in members], f"channel layout unclear: {error}", None
        if channel_map.shape != (linear.in_features,):
            return [], f"channel layout unclear: probe gave {channel_map.shape[0]} channels for {linear.name}", None
        sinks.append(Sink(linear, channel_map))
    return sinks, None, head_dim


class _ProbeError(Exception):
    pass


def _probe(source: ir.Value, nodes: list[ir.Node], head_dim: int | None = None) -> tuple[np.ndarray, int | None]:
    array = np.broadcast_to(np.arange(1, _channels(source) + 1, dtype=np.int64), _concrete(source.shape))
    current = source
    shapes = {id(source): array.shape}  # each path value's shape in the probe (token dims 1), for Shape readers
    for node, output in nodes:
        if node.op_type == "MatMul":  # softmax(Q K^T) @ V: the array is V, its last axis one head
            head_dim = head_dim or int(array.shape[-1])
        array = _replay(node, output, array, shapes)
        shapes[id(output)] = array.shape
        current = output
    rows = array.reshape(-1, array.shape[-1])
    if rows.shape[0] and np.any(rows != rows[:1]):
        raise _ProbeError(f"channels mix with token positions at '{current.name}'")
    if np.any(rows[0] == 0):
        raise _ProbeError(f"some channels of '{current.name}' do not come from the producer")
    return rows[0] - 1, head_dim


def _channels(value: ir.Value) -> int:
    if value.shape is None or not isinstance(value.shape[-1], int):
        raise _ProbeError(f"the channel count of '{value.name}' is unknown")
    return int(value.shape[-1])


def _concrete(shape: ir.Shape | None, allow_one_unknown: bool = False) -> tuple[int, ...]:
    """Static dims, with every symbolic (token) dim set to 1: the probe follows channels, not tokens.

    A dim shape inference left anonymous (after a Slice or Reshape to a run-time shape, as
    optimum's and the opset-11 exports write position ids and attention outputs) is a
    token dim too, except on the last axis, where a linear's channels are: a wrong guess
    there would go unnoticed, while a wrong token dim makes the sinks' channel count check
    (`_probe_sinks`) refuse the region.
    """
    if shape is None:
        raise _ProbeError("a shape on the path is unknown")
    last = len(shape) - 1
    dims = [d if isinstance(d, int) else (1 if getattr(d, "value", None) is not None or axis < last else -1)
            for axis, d in enumerate(shape)]
    if dims.count(-1) > (1 if allow_one_unknown else 0):
        raise _ProbeError("a shape on the path has unknown dimensions")
    return tuple(dims)


def _shape_target(node: ir.Node, current: tuple[int, ...], copy_zeros: bool,
                  shapes: dict[int, tuple[int, ...]]) -> tuple[int, ...]:
    """The target of a Reshape or Expand, read from its shape input (``copy_zeros``: Reshape's 0 keeps a dim).

    Exporters build it at run time as ``Concat`` of constants (heads, head size, -1) and
    of dims read from a tensor (``Unsqueeze(Gather(Shape(x), i))``); a symbolic dim read that
    way is a token dim, 1 in the probe, as `_concrete` makes it.
    """
    shape = node.inputs[1]
    constant = constant_array(shape)
    producer = shape.producer()
    if constant is not None:
        pieces = [int(d) for d in constant.reshape(-1)]
    elif producer is not None and producer.op_type == "Concat":
        pieces = []
        for piece in producer.inputs:
            values = constant_array(piece)
            pieces += [int(d) for d in values.reshape(-1)] if values is not None else [_shape_entry(piece, shapes)]
    else:
        raise _ProbeError(f"the target shape of {node.op_type} '{node.name}' is computed at run time")
    # Reshape's 0 copies the input's dim at that position (allowzero=0, the default).
    return tuple(current[i] if copy_zeros and d == 0 and i < len(current) else d for i, d in enumerate(pieces))


def _shape_entry(value: ir.Value, shapes: dict[int, tuple[int, ...]]) -> int:
    """One dim of a run-time shape: ``Unsqueeze(Gather(Shape(x), i))`` is dim ``i`` of ``x``.

    For ``x`` on the probe's path that is ``x``'s probe shape (token dims 1, heads as
    replayed); elsewhere its inferred dim, 1 when symbolic (a token dim). Products of such
    dims (``kv_heads * n_rep`` in grouped-query attention) multiply.
    """
    node = value.producer()
    if node is not None and node.op_type == "Unsqueeze":
        node = node.inputs[0].producer()
    if node is not None and node.op_type == "Mul" and len(node.inputs) == 2:
        factors = [constant_array(v) for v in node.inputs]
        return math.prod(int(f.reshape(-1)[0]) if f is not None and f.size == 1 else _shape_entry(v, shapes)
                         for f, v in zip(factors, node.inputs))
    if node is not None and node.op_type == "Gather":
        index, shape_node = constant_array(node.inputs[1]), node.inputs[0].producer()
        if index is not None and index.size == 1 and shape_node is not None and shape_node.op_type == "Shape":
            source = shape_node.inputs[0]
            start = shape_node.attributes["start"].value if "start" in shape_node.attributes else 0
            known = shapes.get(id(source), source.shape)
            if known is not None:
                dims = list(known)[start:]
                position = int(index.reshape(-1)[0])
                if -len(dims) <= position < len(dims):
                    dim = dims[position]
                    return dim if isinstance(dim, int) else 1
    raise _ProbeError(f"the Reshape dim '{value.name}' is computed at run time")


def _replay(node: ir.Node, output: ir.Value, array: np.ndarray, shapes: dict[int, tuple[int, ...]]) -> np.ndarray:
    op = node.op_type
    if op in ("Identity", "Dropout", "Relu", "Mul", "MatMul", "Concat"):
        # Relu/Mul: elementwise on the same channels; MatMul: attention with P = identity; Concat: the KV cache
        # adds past tokens, whose channels are the new tokens' channels
        return array
    if op == "Transpose":
        perm = node.attributes.get("perm")
        return np.transpose(array, perm.value if perm is not None else None)
    if op == "Reshape":
        try:  # the shape input says it exactly; inferred output shapes may have symbolic head dims
            target = _shape_target(node, array.shape, copy_zeros=True, shapes=shapes)
        except _ProbeError:
            target = _concrete(node.outputs[0].shape, allow_one_unknown=True)
        try:
            return array.reshape(target)
        except ValueError:
            raise _ProbeError(f"Reshape '{node.name}' to {list(target)} does not fit its input of shape "
                              f"{list(array.shape)}") from None
    if op == "Expand":  # grouped-query attention repeats kv heads with a run-time target shape
        try:
            target = _shape_target(node, array.shape, copy_zeros=False, shapes=shapes)
        except _ProbeError:
            target = _concrete(node.outputs[0].shape)
        try:
            return np.broadcast_to(array, np.broadcast_shapes(array.shape, target))
        except ValueError:
            raise _ProbeError(f"Expand '{node.name}' to {list(target)} does not fit its input of shape "
                              f"{list(array.shape)}") from None
    if op in ("Unsqueeze", "Squeeze"):
        axes = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if axes is None:
            attr = node.attributes.get("axes")
            axes = np.asarray(attr.value) if attr is not None else None
        if op == "Unsqueeze":
            if axes is None:
                raise _ProbeError("Unsqueeze without constant axes")
            rank = array.ndim + len(axes)
            for axis in sorted(int(a) % rank for a in axes):
                array = np.expand_dims(array, axis)
            return array
        return np.squeeze(array, None if axes is None else tuple(int(a) for a in axes))
    if op == "Split":
        sizes = [int(o.shape[-1]) for o in node.outputs]
        start = sum(sizes[:output.index()])
        return array[..., start:start + sizes[output.index()]]
    if op == "Gather":
        axis = node.attributes.get("axis")
        return np.take(array, constant_array(node.inputs[1]), axis=axis.value if axis is not None else 0)
    raise _ProbeError(f"cannot follow channels through {op}")
