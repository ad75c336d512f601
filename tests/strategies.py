"""Hypothesis strategies for random, valid ONNX models over the op vocabulary qcompiler supports, and the oracle.

The hand-written test graphs cover the forms their authors thought of; exporters write
many more. These strategies draw the forms a transformer or a small CNN takes in the
wild and combine them freely, so the passes and presets meet spellings nobody wrote a
test for:

- transformer blocks on a float input ``[batch, seq, hidden]`` (batch and seq symbolic
  or fixed): pre- or post-norm, LayerNorm/RMSNorm fused or decomposed the way the
  legacy exporter writes them (Pow/ReduceMean/Add/Sqrt/Div/Mul, ``Div(1, x)`` or
  ``Reciprocal``), linears as MatMul(+Add) or as Gemm (``transB``, alpha/beta) between
  the Reshapes to 2-D that legacy exporters emit, GELU (erf or tanh form, or fused),
  ReLU, SiLU and gated MLPs, attention (q/k/v, heads, an optional additive bias input,
  Softmax, o-proj), weights shared between layers and tied by a Transpose, an input
  projection whose transpose is the output head, an inner value exposed as a second
  output, and the no-op Identity/Dropout/Cast nodes exporters leave behind;
- CNNs: Conv (depthwise, strided), BatchNormalization, Relu, residual Add,
  GlobalAveragePool, Flatten, Gemm or MatMul.

The opset is drawn per graph in 11..23 and each op is spelled as that opset spells it
(ReduceMean's axes attribute before 18, LayerNormalization from 17, Gelu from 20,
RMSNormalization from 23). Weights are random normal with a few outlier channels (x20)
so the outlier passes have work; norm gammas are positive, partly negative or partly
zero. Every model is built as an ``onnx.ModelProto`` and checked in full, so a strategy
bug is an error here rather than a finding downstream. A `FuzzCase` carries its plan
(printed on failure; `transformer_case` / `cnn_case` rebuild it) and makes inputs that
fit its shapes at any batch and sequence length.

The oracle at the end (`check_preserving`, `check_preset`) is what must hold for every
drawn model; tests/test_fuzz.py and benchmarks/fuzz.py both use it.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler.artifact import open_artifact
from qcompiler.backend import make_backend
from qcompiler.errors import QCompilerError, VerificationError
from qcompiler.pass_manager import DEFAULT_TOLERANCE
from qcompiler.runtime import make_session, run_batches
from qcompiler.verify import compare_outputs

MIN_OPSET, MAX_OPSET = 11, 23


@dataclass
class FuzzCase:
    """A drawn model, how it was drawn (for people reading a failure), and its input shapes."""

    model: onnx.ModelProto
    description: str
    # Per input: its dims, a name ("batch", "seq") where symbolic.
    inputs: dict[str, list[int | str]] = field(default_factory=dict)

    def feeds(self, count: int, *, batch: int = 2, seq: int = 5, seed: int = 0) -> list[dict[str, np.ndarray]]:
        """``count`` batches of standard-normal inputs; symbolic dims take ``batch`` and ``seq``."""
        rng = np.random.default_rng(seed)
        sizes = {"batch": batch, "seq": seq}
        return [{name: rng.standard_normal([sizes.get(d, d) for d in dims]).astype(np.float32)
                 for name, dims in self.inputs.items()} for _ in range(count)]


class GraphBuilder:
    """Nodes and initializers of one graph at one opset, with the spelling of each op that opset needs."""

    def __init__(self, opset: int, rng: np.random.Generator, constant_nodes: bool):
        self.opset, self.rng, self.constant_nodes = opset, rng, constant_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self._count = 0

    def fresh(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        output = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def weight(self, name: str, array: np.ndarray) -> str:
        """An initializer (written once: a second call with the same name shares it)."""
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.asarray(array), name)
        return name

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def scalar(self, value: float, dtype=np.float32) -> str:
        """A small constant, as a Constant node or an initializer (exporters write both)."""
        array = np.asarray(value, dtype)
        if self.constant_nodes:
            output = self.fresh("const")
            self.nodes.append(helper.make_node("Constant", [], [output], name=output,
                                               value=numpy_helper.from_array(array)))
            return output
        return self.weight(self.fresh("scalar"), array)

    def ints(self, values: list[int]) -> str:
        return self.weight(self.fresh("ints"), np.asarray(values, np.int64))

    def reduce_mean(self, x: str) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.ints([-1])], keepdims=1)
        return self.op("ReduceMean", [x], axes=[-1], keepdims=1)

    def matrix(self, name: str, rows: int, cols: int, outliers: int) -> str:
        """A ``[rows, cols]`` weight scaled for unit-variance outputs, ``outliers`` rows times 20."""
        w = self.rng.standard_normal((rows, cols)).astype(np.float32) / math.sqrt(rows)
        w[self.rng.choice(rows, size=min(outliers, rows), replace=False)] *= 20
        return self.weight(name, w)

    def vector(self, name: str, size: int, *, around: float, outliers: int, flip: float | None = None) -> str:
        """Values near ``around``, ``outliers`` of them times 20, a quarter of them times ``flip`` if given."""
        v = (around + 0.1 * self.rng.standard_normal(size)).astype(np.float32)
        v[self.rng.choice(size, size=min(outliers, size), replace=False)] *= 20
        if flip is not None:
            v[self.rng.choice(size, size=max(1, size // 4), replace=False)] *= flip
        return self.weight(name, v)

    def noise(self, x: str) -> str:
        """Sometimes an op that computes nothing, as exporters leave them: Identity, inference Dropout, Cast."""
        choice = self.rng.integers(6)
        if choice == 0:
            return self.op("Identity", [x])
        if choice == 1:
            return self.op("Dropout", [x])
        if choice == 2:
            return self.op("Cast", [x], to=TensorProto.FLOAT)
        return x


@dataclass
class BlockPlan:
    """The choices one transformer graph is built from (shown when a case fails)."""

    opset: int
    hidden: int
    ffn: int
    heads: int
    layers: int
    pre_norm: bool
    norm: str
    activation: str
    gated: bool
    linear_form: str
    bias: bool
    attention: bool
    # "separate", "shared-qk" (k reads q's initializer) or "tied-vo" (o-proj reads v's through a Transpose).
    attention_weights: str
    share_layers: bool
    tied_mlp: bool
    input_projection: int | None
    tied_head: bool
    final_norm: bool
    outliers: int
    # Norm gammas: all positive, a quarter negative, or a quarter zero.
    gamma: str
    gemm_scaled: bool
    noise: bool
    attention_bias: bool
    # Which [batch, seq, hidden] value inside the graph is a second output (None: only the last).
    aux_output: int | None
    dynamic_shapes: bool
    constant_nodes: bool
    batch: int | str
    seq: int | str


def _norms(opset: int) -> list[str]:
    forms = ["layernorm-decomposed", "rmsnorm-div", "rmsnorm-reciprocal", "rmsnorm-div-one"]
    if opset >= 17:
        forms.append("layernorm")
    if opset >= 23:
        forms.append("rmsnorm")
    return forms


def _activations(opset: int) -> list[str]:
    forms = ["relu", "gelu-erf", "silu", "gelu-tanh-decomposed"]
    if opset >= 20:
        forms += ["gelu", "gelu-tanh"]
    return forms


def _hidden_sizes() -> st.SearchStrategy[int]:
    """Mostly multiples of 8 (what rotations and groups like), sometimes not."""
    return st.one_of(st.sampled_from([8, 16, 24, 32, 48, 64]), st.integers(6, 40))


@st.composite
def block_plans(draw) -> BlockPlan:
    opset = draw(st.integers(MIN_OPSET, MAX_OPSET))
    hidden = draw(_hidden_sizes())
    heads = draw(st.sampled_from([h for h in (1, 2, 4, 8) if hidden % h == 0 and hidden // h >= 2]))
    projection = draw(st.none() | _hidden_sizes())
    return BlockPlan(
        opset=opset, hidden=hidden, ffn=draw(st.sampled_from([hidden, 2 * hidden, 4 * hidden])), heads=heads,
        layers=draw(st.integers(1, 2)), pre_norm=draw(st.booleans()), norm=draw(st.sampled_from(_norms(opset))),
        activation=draw(st.sampled_from(_activations(opset))), gated=draw(st.booleans()),
        linear_form=draw(st.sampled_from(["matmul", "gemm", "gemm-transb", "mixed"])), bias=draw(st.booleans()),
        attention=draw(st.booleans()), attention_weights=draw(st.sampled_from(["separate", "shared-qk", "tied-vo"])),
        share_layers=draw(st.booleans()), tied_mlp=draw(st.booleans()),
        input_projection=projection, tied_head=projection is not None and draw(st.booleans()),
        final_norm=draw(st.booleans()), outliers=draw(st.integers(0, 3)),
        gamma=draw(st.sampled_from(["positive", "negative", "zero"])), gemm_scaled=draw(st.booleans()),
        noise=draw(st.booleans()), attention_bias=draw(st.booleans()), aux_output=draw(st.none() | st.integers(0, 7)),
        dynamic_shapes=draw(st.booleans()), constant_nodes=draw(st.booleans()),
        batch=draw(st.sampled_from(["batch", 2])), seq=draw(st.sampled_from(["seq", 5])))


class TransformerBuilder(GraphBuilder):
    """Builds the graph a `BlockPlan` describes."""

    def __init__(self, plan: BlockPlan, rng: np.random.Generator):
        super().__init__(plan.opset, rng, plan.constant_nodes)
        self.plan = plan
        # Values of shape [batch, seq, hidden] a second graph output may expose.
        self.taps: list[str] = []

    def tap(self, x: str) -> str:
        self.taps.append(x)
        return x

    def key(self, layer: int, name: str) -> str:
        """An initializer name; layers that share weights read the same names."""
        return name if self.plan.share_layers else f"l{layer}_{name}"

    # ------------------------------------------------------------------ norms

    def norm(self, x: str, name: str, channels: int) -> str:
        p, form = self.plan, self.plan.norm
        flip = {"positive": None, "negative": -1.0, "zero": 0.0}[p.gamma]
        gamma = self.vector(f"{name}_gamma", channels, around=1.0, outliers=p.outliers, flip=flip)
        eps = 1e-5 if form.startswith("layernorm") else 1e-6
        if form == "layernorm":
            beta = self.vector(f"{name}_beta", channels, around=0.0, outliers=0)
            return self.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=eps)
        if form == "rmsnorm":
            return self.op("RMSNormalization", [x, gamma], axis=-1, epsilon=eps)
        if form == "layernorm-decomposed":
            centred = self.op("Sub", [x, self.reduce_mean(x)])
            variance = self.reduce_mean(self.op("Pow", [centred, self.scalar(2.0)]))
            std = self.op("Sqrt", [self.op("Add", [variance, self.scalar(eps)])])
            scaled = self.op("Mul", [self.op("Div", [centred, std]), gamma])
            return self.op("Add", [scaled, self.vector(f"{name}_beta", channels, around=0.0, outliers=0)])
        rms = self.op("Sqrt", [self.op("Add", [self.reduce_mean(self.op("Pow", [x, self.scalar(2.0)])),
                                                self.scalar(eps)])])
        if form == "rmsnorm-div":
            normed = self.op("Div", [x, rms])
        else:
            inverse = self.op("Reciprocal", [rms]) if form == "rmsnorm-reciprocal" else \
                self.op("Div", [self.scalar(1.0), rms])
            normed = self.op("Mul", [x, inverse])
        return self.op("Mul", [gamma, normed] if self.rng.random() < 0.5 else [normed, gamma])

    # ---------------------------------------------------------------- linears

    def linear(self, x: str, name: str, rows: int, cols: int, *, weight: str | None = None,
               transposed: bool = False) -> str:
        """``x @ W (+ b)`` on ``[batch, seq, rows]`` as MatMul(+Add) or Gemm between Reshapes.

        ``weight`` names an existing initializer (shared); ``transposed`` reads it through
        a Transpose node (tied: it is stored ``[cols, rows]``).
        """
        p = self.plan
        if weight is None:
            weight = self.matrix(name, rows, cols, p.outliers)
        bias = self.vector(f"{name}_bias", cols, around=0.0, outliers=0) if p.bias else None
        form = p.linear_form if p.linear_form != "mixed" else self.rng.choice(["matmul", "gemm", "gemm-transb"])
        if p.noise:
            x = self.noise(x)
        if transposed or form == "matmul":
            w = self.op("Transpose", [weight], perm=[1, 0]) if transposed else weight
            y = self.op("MatMul", [x, w])
            return self.op("Add", [y, bias] if self.rng.random() < 0.5 else [bias, y]) if bias else y
        flat = self.op("Reshape", [x, self.ints([-1, rows])])
        scale = {"alpha": 0.5, "beta": 2.0} if p.gemm_scaled else {}
        if form == "gemm-transb":
            stored = self.weight(f"{weight}_t", np.ascontiguousarray(self.array(weight).T))
            y = self.op("Gemm", [flat, stored] + ([bias] if bias else []), transB=1, **scale)
        else:
            y = self.op("Gemm", [flat, weight] + ([bias] if bias else []), **scale)
        return self.op("Reshape", [y, self.leading_shape(x, cols, copy=False)])

    def leading_shape(self, x: str, last: int, *, copy: bool = True) -> str:
        """``[batch, seq, last]`` of ``x`` for a Reshape.

        Computed from ``Shape(x)`` as legacy exporters do, or constant: ``[0, 0, last]``
        where the Reshape's own input has those leading dims (``copy``), the fixed dims otherwise.
        """
        p = self.plan
        fixed = isinstance(p.batch, int) and isinstance(p.seq, int)
        if not p.dynamic_shapes and (copy or fixed):
            return self.ints([0, 0, last] if copy else [p.batch, p.seq, last])
        leading = self.op("Slice", [self.op("Shape", [x]), self.ints([0]), self.ints([2])])
        return self.op("Concat", [leading, self.ints([last])], axis=0)

    # ------------------------------------------------------------ activations

    def activation(self, x: str) -> str:
        form = self.plan.activation
        if form == "relu":
            return self.op("Relu", [x])
        if form == "silu":
            return self.op("Mul", [x, self.op("Sigmoid", [x])])
        if form == "gelu":
            return self.op("Gelu", [x])
        if form == "gelu-tanh":
            return self.op("Gelu", [x], approximate="tanh")
        if form == "gelu-erf":
            erf = self.op("Erf", [self.op("Div", [x, self.scalar(math.sqrt(2.0))])])
            return self.op("Mul", [self.op("Mul", [x, self.op("Add", [erf, self.scalar(1.0)])]), self.scalar(0.5)])
        cubic = self.op("Mul", [self.op("Pow", [x, self.scalar(3.0)]), self.scalar(0.044715)])
        inner = self.op("Mul", [self.op("Add", [x, cubic]), self.scalar(math.sqrt(2.0 / math.pi))])
        half = self.op("Mul", [x, self.scalar(0.5)])
        return self.op("Mul", [half, self.op("Add", [self.op("Tanh", [inner]), self.scalar(1.0)])])

    # ----------------------------------------------------------------- blocks

    def attention(self, x: str, layer: int) -> str:
        p = self.plan
        h, d = p.heads, p.hidden // p.heads

        def heads(name: str, perm: list[int], weight: str | None = None) -> str:
            projected = self.linear(x, self.key(layer, name), p.hidden, p.hidden, weight=weight)
            split = self.op("Reshape", [projected, self.ints([0, 0, h, d])])
            return self.op("Transpose", [split], perm=perm)

        q = heads("q", [0, 2, 1, 3])
        shared = self.key(layer, "q") if p.attention_weights == "shared-qk" else None
        k, v = heads("k", [0, 2, 3, 1], shared), heads("v", [0, 2, 1, 3])
        scores = self.op("MatMul", [q, k])
        scores = self.op("Div", [scores, self.scalar(math.sqrt(d))]) if layer % 2 == 0 else \
            self.op("Mul", [scores, self.scalar(1 / math.sqrt(d))])
        if p.attention_bias:
            scores = self.op("Add", [scores, "bias"])
        context = self.op("MatMul", [self.op("Softmax", [scores], axis=-1), v])
        merged = self.op("Reshape", [self.op("Transpose", [context], perm=[0, 2, 1, 3]),
                                     self.leading_shape(x, p.hidden)])
        tied = self.key(layer, "v") if p.attention_weights == "tied-vo" else None
        return self.tap(self.linear(merged, self.key(layer, "o"), p.hidden, p.hidden, weight=tied,
                                    transposed=tied is not None))

    def mlp(self, x: str, layer: int) -> str:
        p = self.plan
        up_name = self.key(layer, "up")
        up = self.linear(x, up_name, p.hidden, p.ffn)
        hidden = self.activation(up)
        if p.gated:
            hidden = self.op("Mul", [hidden, self.linear(x, self.key(layer, "gate"), p.hidden, p.ffn)])
        if p.tied_mlp:
            return self.linear(hidden, self.key(layer, "down"), p.ffn, p.hidden, weight=up_name, transposed=True)
        return self.linear(hidden, self.key(layer, "down"), p.ffn, p.hidden)

    def block(self, x: str, layer: int) -> str:
        p = self.plan
        sublayers = ([self.attention] if p.attention else []) + [self.mlp]
        for index, sublayer in enumerate(sublayers):
            name = self.key(layer, f"norm{index}")
            if p.pre_norm:
                x = self.tap(self.op("Add", [x, sublayer(self.tap(self.norm(x, name, p.hidden)), layer)]))
            else:
                x = self.tap(self.norm(self.tap(self.op("Add", [x, sublayer(x, layer)])), name, p.hidden))
        return x

    def build(self) -> tuple[dict[str, list], dict[str, tuple[str, list]]]:
        """The graph from input ``x``: the inputs' dims, and per output its value and dims."""
        p = self.plan
        width = p.input_projection or p.hidden
        inputs = {"x": [p.batch, p.seq, width]}
        if p.attention and p.attention_bias:
            inputs["bias"] = [p.batch, 1, 1, p.seq]
        x = "x"
        if p.input_projection:
            x = self.linear(x, "embed", width, p.hidden)
        for layer in range(p.layers):
            x = self.block(x, layer)
        if p.final_norm:
            x = self.norm(x, "final_norm", p.hidden)
        outputs = {"y": (x, [p.batch, p.seq, p.hidden])}
        if p.tied_head:
            outputs["y"] = (self.linear(x, "head", p.hidden, width, weight="embed", transposed=True),
                            [p.batch, p.seq, width])
        if p.aux_output is not None:
            outputs["aux"] = (self.taps[p.aux_output % len(self.taps)], [p.batch, p.seq, p.hidden])
        return inputs, outputs


def _finish(builder: GraphBuilder, inputs: dict[str, list], outputs: dict[str, tuple[str, list]]) -> onnx.ModelProto:
    """The model with ``outputs`` (name -> value, dims), checked in full (a strategy bug fails here, not downstream).

    Initializers no node reads are dropped: a Gemm with ``transB=1`` reads a transposed
    copy of the weight drawn for it.
    """
    for name, (value, _) in outputs.items():
        builder.nodes.append(helper.make_node("Identity", [value], [name], name=f"output_{name}"))
    read = {name for node in builder.nodes for name in node.input}
    graph = helper.make_graph(
        builder.nodes, "fuzz",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, (_, dims) in outputs.items()],
        initializer=[tensor for name, tensor in builder.initializers.items() if name in read])
    opset = [helper.make_opsetid("", builder.opset)]
    model = helper.make_model(graph, opset_imports=opset, ir_version=helper.find_min_ir_version_for(opset))
    onnx.checker.check_model(model, full_check=True)
    return model


def transformer_case(plan: BlockPlan, seed: int = 0) -> FuzzCase:
    """The transformer ``plan`` describes, its weights drawn from ``seed`` (regression tests name both)."""
    builder = TransformerBuilder(plan, np.random.default_rng(seed))
    inputs, outputs = builder.build()
    return FuzzCase(_finish(builder, inputs, outputs), f"transformer {plan} seed={seed}", inputs)


@st.composite
def transformer_cases(draw) -> FuzzCase:
    return transformer_case(draw(block_plans()), draw(st.integers(0, 2**32 - 1)))


@dataclass
class CnnPlan:
    opset: int
    channels: int
    image: int
    stages: int
    kernel: int
    depthwise: bool
    stride: int
    batch_norm: bool
    residual: bool
    conv_bias: bool
    classes: int
    head: str
    batch: int | str
    constant_nodes: bool


@st.composite
def cnn_plans(draw) -> CnnPlan:
    return CnnPlan(opset=draw(st.integers(MIN_OPSET, MAX_OPSET)), channels=draw(st.sampled_from([3, 4, 8, 16])),
                   image=draw(st.integers(4, 10)), stages=draw(st.integers(1, 3)), kernel=draw(st.sampled_from([1, 3])),
                   depthwise=draw(st.booleans()), stride=draw(st.sampled_from([1, 1, 2])),
                   batch_norm=draw(st.booleans()), residual=draw(st.booleans()), conv_bias=draw(st.booleans()),
                   classes=draw(st.integers(2, 24)), head=draw(st.sampled_from(["gemm", "gemm-transb", "matmul"])),
                   batch=draw(st.sampled_from(["batch", 2])), constant_nodes=draw(st.booleans()))


def cnn_case(plan: CnnPlan, seed: int = 0) -> FuzzCase:
    """The CNN ``plan`` describes, its weights drawn from ``seed``."""
    b = GraphBuilder(plan.opset, np.random.default_rng(seed), plan.constant_nodes)
    width = plan.channels * 2
    x = "pixels"
    channels_in = plan.channels
    for stage in range(plan.stages):
        group = channels_in if plan.depthwise else 1
        kernel = b.rng.standard_normal((width, channels_in // group, plan.kernel, plan.kernel)).astype(np.float32)
        kernel /= math.sqrt(channels_in // group * plan.kernel ** 2)
        inputs = [x, b.weight(f"conv{stage}_w", kernel)]
        if plan.conv_bias:
            inputs.append(b.vector(f"conv{stage}_b", width, around=0.0, outliers=0))
        pad = plan.kernel // 2
        y = b.op("Conv", inputs, kernel_shape=[plan.kernel] * 2, pads=[pad] * 4, strides=[plan.stride] * 2,
                 group=group)
        if plan.batch_norm:
            stats = [b.vector(f"bn{stage}_{n}", width, around=a, outliers=o)
                     for n, a, o in (("scale", 1.0, 1), ("bias", 0.0, 0), ("mean", 0.0, 0))]
            variance = b.weight(f"bn{stage}_var", (0.5 + b.rng.random(width)).astype(np.float32))
            y = b.op("BatchNormalization", [y, *stats, variance], epsilon=1e-5)
        y = b.op("Relu", [y])
        x = b.op("Add", [x, y]) if plan.residual and channels_in == width and plan.stride == 1 else y
        channels_in = width
    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    w = b.matrix("fc", width, plan.classes, 1)
    bias = b.vector("fc_b", plan.classes, around=0.0, outliers=0)
    if plan.head == "matmul":
        out = b.op("Add", [b.op("MatMul", [pooled, w]), bias])
    elif plan.head == "gemm":
        out = b.op("Gemm", [pooled, w, bias])
    else:
        stored = b.weight("fc_t", np.ascontiguousarray(b.array(w).T))
        out = b.op("Gemm", [pooled, stored, bias], transB=1)
    dims = [plan.batch, plan.channels, plan.image, plan.image]
    return FuzzCase(_finish(b, {"pixels": dims}, {"y": (out, [plan.batch, plan.classes])}), f"cnn {plan} seed={seed}",
                    {"pixels": dims})


@st.composite
def cnn_cases(draw) -> FuzzCase:
    return cnn_case(draw(cnn_plans()), draw(st.integers(0, 2**32 - 1)))


def fuzz_cases() -> st.SearchStrategy[FuzzCase]:
    """Any drawn model: a transformer three times in four, a CNN otherwise."""
    return st.one_of(transformer_cases(), transformer_cases(), transformer_cases(), cnn_cases())


# --------------------------------------------------------------------------- the oracle
#
# What must hold for every drawn model, shared by tests/test_fuzz.py (a fixed-seed budget)
# and benchmarks/fuzz.py (a long one), so both hold qcompiler to the same bar.

# Every function-preserving pass and option that changes what the pass does; compile()
# runs the normalize preset in front of each (so its passes are checked on every run),
# except in front of convert-opset, which then runs alone, to an older opset too.
PRESERVING = ("normalize", "fold-norm", "fold-norm(rmsnorm=true)", "smooth", "smooth(search=true)", "shift",
              "shift(scale=true)", "rotate", "rotate(kind=random)", "rotate(mode=online)", "rotate(mode=offline)",
              "fold-norm,shift,smooth,rotate", "equalize", "convert-opset(version=17)", "convert-opset(version=11)",
              "reassemble(rows=64)", "affine(steps=2,rows=64)")
PRESETS = ("w8a8", "w8a8-dyn", "w8a16", "w4a16", "w4a8", "w4a4", "fp8", "mxfp8", "mxfp4", "nvfp4")
BACKENDS = ("simulate", "ort")
# Text that belongs to a traceback or a library's own error, never to a refusal of qcompiler's.
LEAKED = ("Traceback", "Error:", "error(s)", "[ONNXRuntimeError]", "cannot reshape array", "index out of",
          "object has no attribute", "unexpected keyword", "NoneType", "operands could not be broadcast",
          "numpy", "onnx_ir", "onnxscript", "not subscriptable", "KeyError", "ValueError")


@dataclass
class Outcome:
    """One run of a pipeline on a drawn model: ``ok``, ``refused`` (a one-sentence QCompilerError) or ``failed``."""

    pipeline: str
    backend: str
    status: str
    message: str = ""


def refusal_problem(message: str) -> str | None:
    """Why ``message`` is not a one-sentence refusal, or None if it is one."""
    text = message.strip()
    if not text or "\n" in text:
        return "it is empty or spans several lines"
    leaked = next((marker for marker in LEAKED if marker in text), None)
    if leaked:
        return f"it carries another library's error text ({leaked!r})"
    if re.search(r"[.!?;]\s+[A-Z]", text):
        return "it is more than one sentence"
    return None


def _classify(pipeline: str, backend: str, exc: BaseException) -> Outcome:
    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, VerificationError):
        return Outcome(pipeline, backend, "failed", f"equivalence violation: {first}")
    if isinstance(exc, QCompilerError):
        problem = refusal_problem(str(exc))
        if problem:
            return Outcome(pipeline, backend, "failed", f"refusal is not one sentence ({problem}): {str(exc)!r}")
        return Outcome(pipeline, backend, "refused", first)
    return Outcome(pipeline, backend, "failed", f"{type(exc).__name__}: {first}")


def _outputs(model: ir.Model | onnx.ModelProto, batches: list[dict]) -> list[dict[str, np.ndarray]]:
    loaded = model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)
    return run_batches(make_session(loaded), batches)


def fresh_feeds(case: FuzzCase) -> list[dict[str, np.ndarray]]:
    """Inputs the model was not calibrated on, at other batch and sequence sizes where those are symbolic.

    One batch is a single token: attention over one position and reshapes of one row.
    """
    return case.feeds(1, batch=3, seq=7, seed=1) + case.feeds(1, batch=1, seq=1, seed=2)


def check_preserving(case: FuzzCase, pipeline: str) -> Outcome:
    """Compile ``pipeline`` (verified by the pass manager), then compare with the source on fresh inputs.

    The fresh inputs have other batch and sequence sizes than the calibration ones, so a
    rewrite that baked a calibration shape into the graph fails too. The bound is the pass
    tolerance once per pass that changed the model: each pass is allowed that much.
    """
    try:
        # compile() puts the normalize preset in front of any pipeline; None runs it alone.
        result = qcompiler.compile(ir.serde.deserialize_model(case.model),
                                   None if pipeline == "normalize" else pipeline, calib=case.feeds(4))
        fresh = fresh_feeds(case)
        errors = compare_outputs(_outputs(case.model, fresh), _outputs(result.model, fresh))
    except Exception as exc:  # noqa: BLE001 - sorting every exception is the point
        return _classify(pipeline, "simulate", exc)
    changed = sum(1 for record in result.report.passes if record.modified)
    bound = DEFAULT_TOLERANCE * max(1, changed)
    output, worst_error = max(errors.items(), key=lambda item: item[1]["relative_error"])
    if not worst_error["relative_error"] <= bound:
        return Outcome(pipeline, "simulate", "failed",
                       f"equivalence violation on fresh inputs: output '{output}' relative error "
                       f"{worst_error['relative_error']:.3g} above {bound:g}")
    return Outcome(pipeline, "simulate", "ok")


def check_preset(case: FuzzCase, pipeline: str, backend: str) -> Outcome:
    """Compile ``pipeline`` for ``backend`` into an artifact, open it as `qcompile run` does, run it on fresh inputs.

    The artifact must give every output of the source, in the source's shape, finite.
    """
    fresh = fresh_feeds(case)
    try:
        with tempfile.TemporaryDirectory(prefix="qcompiler-fuzz-") as folder:
            out = Path(folder) / "out"
            qcompiler.compile(ir.serde.deserialize_model(case.model), pipeline, calib=case.feeds(4), output=out,
                              backend=backend)
            path, manifest = open_artifact(out)
            session = make_backend(manifest["backend"]).session(out, manifest, ir.load(path))
            got = [dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds))) for feeds in fresh]
        expected = _outputs(case.model, fresh)
    except Exception as exc:  # noqa: BLE001
        return _classify(pipeline, backend, exc)
    for want, have in zip(expected, got):
        for name, array in want.items():
            if name not in have or have[name].shape != array.shape:
                shape = have[name].shape if name in have else "missing"
                return Outcome(pipeline, backend, "failed",
                               f"output '{name}' is {shape}, the source's is {array.shape}")
            if not np.all(np.isfinite(have[name])):
                return Outcome(pipeline, backend, "failed", f"output '{name}' has non-finite values")
    return Outcome(pipeline, backend, "ok")
