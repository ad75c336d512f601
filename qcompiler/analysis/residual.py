"""The residual stream: every value a norm reads, the writers that add into it, its readers.

QuaRot/SliceGPT rotate the whole residual stream of a pre-norm model by one orthogonal
``Q``: writers emit ``w Q``, norms commute with ``Q`` and the linears after them take
``Q^T W``. That is only exact when *every* writer and *every* reader is accounted for,
so the stream is found as a whole. Starting from each norm's input, values are
collected through the ops a rotation of the last axis passes through unchanged
(``Add`` of two stream values, Reshape/Transpose/Squeeze/Unsqueeze/Expand that keep the
channel axis last and whole, token Gather, Concat on a token axis); what feeds that set
from outside is a writer, what reads it from outside is a reader. Writers are linears,
embedding tables (Gather from a constant), constants (position embeddings, class
tokens) and convolutions whose channel axis is moved last (patch embeddings); readers
are norms, or anything else, which is recorded. A stream fed by a norm's output is a
post-norm model (BERT): the stream passes *through* the norm, which no rotation does.
Nothing depends on layer names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qcompiler.analysis.linears import Linear, constant_array, find_linears, is_constant, module_path

ROTATE, CENTER = "rotate", "center"
NORMS = ("LayerNormalization", "RMSNormalization")
_SHAPE_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Expand", "Identity", "Dropout"}


@dataclass(frozen=True)
class Target:
    """A constant that carries stream channels: input ``index`` of ``node``, channels on ``axis``."""

    node: ir.Node
    index: int
    axis: int


@dataclass
class Writer:
    """Something added into the stream: ``linear``, ``embedding``, ``constant``, ``conv``, or what refuses."""

    kind: str
    value: ir.Value
    targets: list[Target]
    linear: Linear | None = None
    problem: str | None = None

    @property
    def name(self) -> str:
        if self.linear is not None:
            return self.linear.name
        if self.kind == "constant":
            return self.value.name or "constant"
        node = self.targets[0].node if self.targets else self.value.producer()
        return (node.name or node.op_type) if node is not None else (self.value.name or "?")

    @property
    def label(self) -> str:
        """The source module's path where the exporter kept it (what users name layers by), else `name`."""
        if self.linear is not None:
            return self.linear.layer
        node = self.targets[0].node if self.targets else self.value.producer()
        return module_path(node, (), self.name) if node is not None else self.name


@dataclass
class Exposure:
    """Uses of ``value`` outside the linears: ``(node, input index)``, ``(None, 0)`` for a graph output."""

    value: ir.Value
    uses: list[tuple[ir.Node | None, int]]


@dataclass
class Reader:
    """A use of the stream from outside it: a norm (``layernorm``/``rmsnorm``), a ``linear``, an ``output``, other.

    For norms, ``sinks`` are the linears reading the norm output through channel-keeping
    ops (they can absorb ``Q^T``), ``exposed`` the other uses of that tree (``None`` for
    a graph output), which would need ``Q^T`` undone, and ``plain`` says the norm has a
    uniform gamma and no beta, so that it commutes with a rotation.
    """

    kind: str
    value: ir.Value
    node: ir.Node | None
    sinks: list[Linear] = field(default_factory=list)
    exposed: list[Exposure] = field(default_factory=list)
    plain: bool = False

    @property
    def name(self) -> str:
        if self.node is None:
            return f"graph output '{self.value.name}'"
        return self.node.name or self.node.op_type

    @property
    def label(self) -> str:
        """The source module's path where the exporter kept it, else `name`."""
        return self.name if self.node is None else module_path(self.node, (), self.name)

    @property
    def is_norm(self) -> bool:
        return self.kind in ("layernorm", "rmsnorm")


@dataclass
class Stream:
    """One residual stream; ``refused`` says per transform (``rotate``, ``center``) why it cannot be done."""

    channels: int
    values: list[ir.Value]
    writers: list[Writer]
    readers: list[Reader]
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.values[0].name or "?"

    @property
    def needs_centering(self) -> bool:
        """A LayerNorm reader subtracts the mean, which a rotation does not commute with."""
        return any(r.kind == "layernorm" for r in self.readers)

    def can(self, transform: str) -> bool:
        return transform not in self.refused

    def describe(self) -> str:
        norms = sum(r.is_norm for r in self.readers)
        return (f"{self.name} ({self.channels} channels): {len(self.writers)} writers, "
                f"{norms} norm readers, {len(self.readers) - norms} other readers")


def find_streams(graph: ir.Graph) -> list[Stream]:
    """Every residual stream of a normalized graph, judged for rotation and for centering."""
    linears = find_linears(graph)
    by_output = {linear.output: linear for linear in linears}
    by_matmul = {id(linear.matmul): linear for linear in linears}
    owner: dict[ir.Value, int] = {}
    streams: list[Stream] = []
    for node in graph:
        if node.op_type in NORMS and _last_axis_norm(node) and node.inputs[0] not in owner:
            channels = _channels(node.inputs[0])
            if channels is None:
                continue
            stream = _collect(node.inputs[0], channels, by_output, by_matmul)
            for value in stream.values:
                owner.setdefault(value, len(streams))
            streams.append(stream)
    streams = _merge_post_norm(streams, owner)
    position = {id(node): i for i, node in enumerate(graph)}
    last = len(position)
    for stream in streams:
        stream.writers.sort(key=lambda w: position.get(id(w.targets[0].node if w.targets else w.value.producer()), -1))
        stream.readers.sort(key=lambda r: position.get(id(r.node), last))
        _judge(stream)
    return streams


# --- collecting the stream ----------------------------------------------------------------------


def _collect(seed: ir.Value, n: int, by_output: dict, by_matmul: dict) -> Stream:
    values: dict[ir.Value, None] = {}
    writers: list[Writer] = []
    readers: list[Reader] = []
    queue = [seed]
    while queue:
        value = queue.pop()
        if value in values:
            continue
        values[value] = None
        writer = _writer(value, n, by_output)
        if writer is not None:
            writers.append(writer)
        else:
            node = value.producer()
            for index in _data_inputs(node):
                source = node.inputs[index]
                if is_constant(source):
                    writers.append(_constant_writer(node, index, n))
                else:
                    queue.append(source)
        for use in value.uses():
            if use.idx in _data_inputs(use.node) and _keeps_channels(use.node, n):
                queue.append(use.node.outputs[0])
            else:
                readers.append(_reader(value, use.node, use.idx, by_matmul))
        if value.is_graph_output():
            readers.append(Reader("output", value, None))
    return Stream(n, list(values), writers, readers)


def _data_inputs(node: ir.Node | None) -> list[int]:
    """Inputs of a stream op that carry stream channels (``[]`` for a node that is no stream op)."""
    if node is None or node.domain not in ("", "ai.onnx"):
        return []
    if node.op_type in ("Add", "Concat"):
        return list(range(len(node.inputs)))
    if node.op_type in _SHAPE_OPS or node.op_type in ("Transpose", "Gather"):
        return [0]
    return []


def _keeps_channels(node: ir.Node, n: int) -> bool:
    """Whether ``node`` passes a rotation of the last axis through: channels stay last and whole."""
    if not _data_inputs(node) or _channels(node.outputs[0]) != n:
        return False
    op, rank = node.op_type, _rank(node.outputs[0])
    if op in ("Add", "Concat"):
        if op == "Concat" and (rank is None or _axis(node, 0) % rank == rank - 1):
            return False
        return all(_channels(v) == n for v in node.inputs)
    if _channels(node.inputs[0]) != n:
        return False
    if op == "Transpose":
        perm = node.attributes.get("perm")
        return perm is not None and rank is not None and list(perm.value)[-1] == rank - 1
    if op == "Gather":
        data_rank = _rank(node.inputs[0])
        return data_rank is not None and _axis(node, 0) % data_rank != data_rank - 1
    return True


def _writer(value: ir.Value, n: int, by_output: dict) -> Writer | None:
    """The writer producing ``value``, or None when its producer is a stream op to walk through."""
    if value in by_output:
        linear = by_output[value]
        targets = [Target(linear.matmul, 1, 1)]
        if linear.bias is not None:
            targets.append(Target(linear.bias_add, _index_of(linear.bias_add, linear.bias), -1))
        return Writer("linear", value, targets, linear)
    node = value.producer()
    if node is None:
        return Writer("unabsorbable", value, [], problem=f"graph input '{value.name}' is added into the stream")
    if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and _axis(node, 0) == 0:
        table = constant_array(node.inputs[0])
        if table is not None and table.ndim == 2 and table.shape[1] == n:
            return Writer("embedding", value, [Target(node, 0, -1)])
    if _data_inputs(node) and _keeps_channels(node, n):
        return None
    if node.op_type in NORMS:
        return Writer("norm", value, [], problem=f"post-norm: the output of {node.name or node.op_type} is the "
                                                 "residual stream, and a rotation does not pass through a norm")
    conv = _conv_writer(value, n)
    if conv is not None:
        return conv
    return Writer("unabsorbable", value, [], problem=f"writer {node.name or node.op_type} ({node.op_type}) "
                                                     "cannot absorb a rotation of its output")


def _constant_writer(node: ir.Node, index: int, n: int) -> Writer:
    value = node.inputs[index]
    if _channels(value) != n or constant_array(value) is None:
        return Writer("unabsorbable", value, [], problem=f"constant '{value.name}' is added with other than {n} channels")
    return Writer("constant", value, [Target(node, index, -1)])


def _conv_writer(value: ir.Value, n: int) -> Writer | None:
    """A Conv (patch embedding) whose output channels reach the last axis through Reshape/Transpose only."""
    chain: list[ir.Node] = []
    current = value
    while (node := current.producer()) is not None and node.op_type in ("Reshape", "Transpose"):
        chain.append(node)
        current = node.inputs[0]
    conv = current.producer()
    if conv is None or conv.op_type != "Conv" or not chain:
        return None
    weight = constant_array(conv.inputs[1])
    group = conv.attributes.get("group")
    if weight is None or weight.shape[0] != n or (group is not None and group.value != 1):
        return None
    if any(len(v.uses()) != 1 or v.is_graph_output() for v in [current] + [c.outputs[0] for c in chain[1:]]):
        return None
    if not _channels_reach_last_axis(current, list(reversed(chain))):
        return None
    targets = [Target(conv, 1, 0)]
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        targets.append(Target(conv, 2, 0))
    return Writer("conv", value, targets)


def _channels_reach_last_axis(source: ir.Value, chain: list[ir.Node]) -> bool:
    """Replay Reshape/Transpose on an array holding each element's channel (axis 1) number."""
    dims = [d if isinstance(d, int) else 1 for d in source.shape] if source.shape is not None else None
    if dims is None or len(dims) < 2:
        return False
    probe = np.broadcast_to(np.arange(dims[1]).reshape([1, -1] + [1] * (len(dims) - 2)), dims)
    for node in chain:
        if node.op_type == "Transpose":
            perm = node.attributes.get("perm")
            probe = np.transpose(probe, perm.value if perm is not None else None)
        else:
            shape = node.outputs[0].shape
            if shape is None or sum(not isinstance(d, int) for d in shape) > 1:
                return False
            probe = probe.reshape([d if isinstance(d, int) else -1 for d in shape])
    rows = probe.reshape(-1, probe.shape[-1])
    return bool(np.all(rows == np.arange(rows.shape[1])))


def _reader(value: ir.Value, node: ir.Node, index: int, by_matmul: dict) -> Reader:
    op = node.op_type
    if op in NORMS and index == 0 and _last_axis_norm(node) and constant_array(node.inputs[1]) is not None:
        sinks, exposed = _norm_tree(node.outputs[0], _channels(value), by_matmul)
        kind = "layernorm" if op == "LayerNormalization" else "rmsnorm"
        return Reader(kind, value, node, sinks, exposed, _plain(node))
    if id(node) in by_matmul and index == 0:
        return Reader("linear", value, node, [by_matmul[id(node)]])
    return Reader(op, value, node)


def _norm_tree(output: ir.Value, n: int | None, by_matmul: dict) -> tuple[list[Linear], list[Exposure]]:
    """Linears reading ``output`` through channel-keeping ops, and the other uses of that tree."""
    sinks: list[Linear] = []
    exposed: list[Exposure] = []
    queue = [output]
    while queue:
        value = queue.pop()
        others: list[tuple[ir.Node | None, int]] = []
        for use in value.uses():
            node = use.node
            if id(node) in by_matmul and use.idx == 0:
                sinks.append(by_matmul[id(node)])
            elif use.idx == 0 and _data_inputs(node) == [0] and _keeps_channels(node, n):
                queue.append(node.outputs[0])
            else:
                others.append((node, use.idx))
        if value.is_graph_output():
            others.append((None, 0))
        if others:
            exposed.append(Exposure(value, others))
    return sinks, exposed


def _plain(norm: ir.Node) -> bool:
    gamma = constant_array(norm.inputs[1])
    beta = constant_array(norm.inputs[2]) if len(norm.inputs) > 2 and norm.inputs[2] is not None else None
    if len(norm.inputs) > 2 and norm.inputs[2] is not None and beta is None:
        return False
    return bool(np.all(gamma == gamma.flat[0]) and gamma.flat[0] != 0 and (beta is None or not np.any(beta)))


# --- post-norm merging and the verdict --------------------------------------------------------------


def _merge_post_norm(streams: list[Stream], owner: dict[ir.Value, int]) -> list[Stream]:
    """Streams joined through a norm (a post-norm model) are one stream: rotated together or not at all."""
    parent = list(range(len(streams)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, stream in enumerate(streams):
        for writer in stream.writers:
            if writer.kind == "norm" and writer.value.producer().inputs[0] in owner:
                parent[root(i)] = root(owner[writer.value.producer().inputs[0]])
    merged: dict[int, Stream] = {}
    for i, stream in enumerate(streams):
        head = merged.setdefault(root(i), Stream(stream.channels, [], [], []))
        head.values += stream.values
        head.writers += stream.writers
        head.readers += stream.readers
    return list(merged.values())


def _judge(stream: Stream) -> None:
    problem = next((w.problem for w in stream.writers if w.problem), None)
    if problem is None and not any(r.is_norm for r in stream.readers):
        problem = "no norm reads the stream"
    if problem:
        stream.refused = {ROTATE: problem, CENTER: problem}
        return
    center = _centering_problem(stream)
    if center:
        stream.refused[CENTER] = center
    rotate = center if stream.needs_centering else None
    if rotate is None:
        unfolded = next((r for r in stream.readers if r.is_norm and not r.plain and not r.exposed), None)
        if unfolded is not None:
            rotate = (f"norm {unfolded.name} has a non-uniform gamma or a beta (not folded, or put back by smooth "
                      "or shift), so it does not commute with a rotation: run fold-norm right before rotate")
    if rotate:
        stream.refused[ROTATE] = rotate


def _centering_problem(stream: Stream) -> str | None:
    """Why the stream cannot be made zero-mean (LayerNorm -> RMSNorm), if it cannot."""
    if not stream.needs_centering:
        return "no LayerNorm reads the stream"
    other = next((r for r in stream.readers if r.kind != "layernorm"), None)
    if other is not None:
        return (f"{other.name} ({other.kind}) reads the stream without subtracting its mean, so making the "
                "stream zero-mean for LayerNorm -> RMSNorm would change what it sees")
    return None


# --- small shape helpers -----------------------------------------------------------------------------


def _channels(value: ir.Value) -> int | None:
    if value.shape is None or len(value.shape) == 0 or not isinstance(value.shape[-1], int):
        return None
    return int(value.shape[-1])


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _axis(node: ir.Node, default: int) -> int:
    attr = node.attributes.get("axis")
    return attr.value if attr is not None else default


def _last_axis_norm(node: ir.Node) -> bool:
    rank = _rank(node.inputs[0])
    axis = _axis(node, -1)
    return axis == -1 or (rank is not None and axis == rank - 1)


def _index_of(node: ir.Node, value: ir.Value) -> int:
    return next(i for i, v in enumerate(node.inputs) if v is value)
