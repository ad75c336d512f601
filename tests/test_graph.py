"""The graph edits every pass and lowering share (`qcompiler.graph`), on tiny graphs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.graph import (
    add_initializer,
    drop_unused,
    insert_after_producer,
    interpose,
    redirect_uses,
    replace_node,
    unique_node_name,
)
from qcompiler.runtime import make_session
from qcompiler.testing import model_from_text

# h feeds two readers and is also a graph output: the case where hand-written edits went wrong.
TWO_READERS = """
<ir_version: 10, opset_import: ["" : 23]>
g (float[2, 4] x) => (float[2, 4] h, float[2, 4] a, float[2, 4] b) {
    h = Relu(x)
    a = Neg(h)
    b = Abs(h)
}
"""

INNER = """
<ir_version: 10, opset_import: ["" : 23]>
g (float[2, 4] x) => (float[2, 4] a) {
    h = Relu(x)
    a = Neg(h)
}
"""

X = np.array([[-1.0, 2.0, -3.0, 4.0], [5.0, -6.0, 7.0, -8.0]], np.float32)


def run(model: ir.Model) -> dict[str, np.ndarray]:
    session = make_session(model)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": X})))


def test_interpose_moves_every_reader_and_keeps_the_output_name():
    model = model_from_text(TWO_READERS)
    h = model.graph.outputs[0]
    double = ir.node("Mul", [h, add_initializer(model.graph, "two", np.array(2.0, np.float32))], name="double")
    result = interpose(model.graph, h, double)
    assert result.name == "h" and h.name == "h_inner" and model.graph.outputs[0] is result
    assert result.shape == h.shape and result.type == h.type
    assert [n.name for n in model.graph] == ["h", "double", "a", "b"]  # right after the producer
    out = run(model)
    relu = np.maximum(X, 0)
    np.testing.assert_array_equal(out["h"], 2 * relu)
    np.testing.assert_array_equal(out["a"], -2 * relu)
    np.testing.assert_array_equal(out["b"], 2 * relu)


def test_interpose_can_take_the_name_of_an_inner_value():
    model = model_from_text(INNER)
    h = next(iter(model.graph)).outputs[0]
    bias = ir.node("Add", [h, add_initializer(model.graph, "one", np.array(1.0, np.float32))], name="bias")
    result = interpose(model.graph, h, bias, take_name=True)
    assert (result.name, h.name) == ("h", "h_inner")
    np.testing.assert_array_equal(run(model)["a"], -(np.maximum(X, 0) + 1))


def test_redirect_uses_moves_only_the_readers_named():
    model = model_from_text(TWO_READERS)
    h = model.graph.outputs[0]
    neg, abs_ = (n for n in model.graph if n.op_type in ("Neg", "Abs"))
    bias = add_initializer(model.graph, "one", np.array(1.0, np.float32))
    plus = ir.node("Add", [h, bias], name="plus")
    plus.outputs[0].shape, plus.outputs[0].type = h.shape, h.type
    insert_after_producer(model.graph, h, plus)
    redirect_uses(model.graph, h, plus.outputs[0], readers=[abs_], graph_output=False)
    assert neg.inputs[0] is h and abs_.inputs[0] is plus.outputs[0] and model.graph.outputs[0] is h
    out = run(model)
    relu = np.maximum(X, 0)
    np.testing.assert_array_equal(out["h"], relu)
    np.testing.assert_array_equal(out["a"], -relu)
    np.testing.assert_array_equal(out["b"], relu + 1)


def test_insert_after_producer_puts_readers_of_a_graph_input_first():
    model = model_from_text(TWO_READERS)
    x = model.graph.inputs[0]
    square = ir.node("Mul", [x, x], name="square")
    insert_after_producer(model.graph, x, square)
    assert next(iter(model.graph)) is square


def test_replace_node_hands_over_name_uses_and_metadata():
    model = model_from_text(TWO_READERS)
    relu = next(iter(model.graph))
    relu.metadata_props["qcompiler.quant"] = "{}"
    # Relu(x) == Max(x, 0): two nodes in place of one, the last one's output taking over.
    zero = add_initializer(model.graph, "zero", np.array(0.0, np.float32))
    copy = ir.node("Identity", [model.graph.inputs[0]], name="copy")
    maximum = ir.node("Max", [copy.outputs[0], zero], name="maximum")
    replace_node(model.graph, relu, [copy, maximum], maximum.outputs[0])
    assert relu not in list(model.graph) and model.graph.outputs[0] is maximum.outputs[0]
    assert maximum.outputs[0].name == "h" and maximum.metadata_props["qcompiler.quant"] == "{}"
    assert "qcompiler.quant" not in copy.metadata_props
    np.testing.assert_array_equal(run(model)["b"], np.maximum(X, 0))


def test_unique_names_and_unused_cleanup():
    model = model_from_text(TWO_READERS)
    assert unique_node_name(model.graph, "h") == "h_1" and unique_node_name(model.graph, "fresh") == "fresh"
    first = add_initializer(model.graph, "w", np.zeros(3, np.float32))
    second = add_initializer(model.graph, "w", np.ones(3, np.float32))
    assert (first.name, second.name) == ("w", "w_1")
    dead = ir.node("Neg", [model.graph.inputs[0]], name="dead")
    model.graph.append(dead)
    drop_unused(model.graph)
    assert "dead" not in [n.name for n in model.graph] and not {"w", "w_1"} & set(model.graph.initializers)
    assert [n.name for n in model.graph] == ["h", "a", "b"]  # what the outputs need stays
