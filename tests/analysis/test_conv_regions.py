"""Convolution regions: producers, paths through ReLU and pools, outside readers, refusals, kernel maxima."""

from __future__ import annotations

import numpy as np

from qcompiler.analysis.conv_regions import find_conv_regions, kernel_input_max
from qcompiler.analysis.regions import ROTATE, SCALE, SHIFT
from qcompiler.testing import model_from_text

GRAPH = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 3, 8, 8] x) => (float[N, 8, 8, 8] y, float[N, 16, 8, 8] n)
      <float[16, 3, 3, 3] w1, float[16] g, float[16] be, float[16] m, float[16] v,
       float[32, 4, 1, 1] w2, float[8, 32, 3, 3] w3> {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1)
        n = BatchNormalization (a, g, be, m, v)
        c = Conv <group = 4> (n, w2)
        r = Relu (c)
        p = MaxPool <kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [1, 1]> (r)
        y = Conv <pads = [1, 1, 1, 1]> (p, w3)
    }"""


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"w1": rng.standard_normal((16, 3, 3, 3)), "g": rng.uniform(0.5, 2, 16), "be": rng.standard_normal(16),
            "m": rng.standard_normal(16), "v": rng.uniform(0.5, 2, 16), "w2": rng.standard_normal((32, 4, 1, 1)),
            "w3": rng.standard_normal((8, 32, 3, 3))}


def _regions(text: str = GRAPH, **changed: np.ndarray):
    weights = {k: v.astype(np.float32) for k, v in {**_weights(np.random.default_rng(0)), **changed}.items()}
    return {r.name: r for r in find_conv_regions(model_from_text(text, weights).graph)}


def test_regions_name_their_producer_path_and_capabilities():
    regions = _regions()
    assert sorted(regions) == ["c", "n", "x"]
    bn, conv, first = regions["n"], regions["c"], regions["x"]
    assert (bn.kind, bn.channels, [s.name for s in bn.sinks]) == ("batchnorm", 16, ["c"])
    assert bn.capabilities == {SCALE, SHIFT}
    assert bn.foreign == [None]  # 'n' is a graph output too: compensated, not refused
    assert (conv.kind, [n.op_type for n in conv.path]) == ("conv", ["MaxPool", "Relu"])
    assert conv.capabilities == {SCALE}
    assert conv.refused[SHIFT] == "ReLU on the path commutes only with positive per-channel scales"
    assert first.refused[SCALE] == "producer is a graph input"
    assert all(ROTATE in r.refused for r in regions.values())


def test_a_padded_sink_refuses_a_shift_and_a_path_value_read_outside_refuses_all():
    padded = GRAPH.replace("c = Conv <group = 4> (n, w2)", "c = Conv <group = 4, pads = [1, 1, 1, 1]> (n, w2)")
    regions = _regions(padded.replace("float[32, 4, 1, 1] w2", "float[32, 4, 3, 3] w2"), w2=np.ones((32, 4, 3, 3)))
    assert regions["n"].capabilities == {SCALE}
    assert "pads its input with zeros" in regions["n"].refused[SHIFT]

    exposed = GRAPH.replace("(float[N, 8, 8, 8] y, float[N, 16, 8, 8] n)", "(float[N, 8, 8, 8] y, float[N, 32, 8, 8] r)")
    assert _regions(exposed)["c"].refused[SCALE] == "'r' is a graph output"


def test_kernel_input_max_follows_groups():
    regions = _regions()
    sink = regions["n"].sinks[0]
    kernel = np.abs(_weights(np.random.default_rng(0))["w2"]).astype(np.float32)  # [32, 4, 1, 1], 4 groups
    expected = np.concatenate([kernel[8 * g:8 * (g + 1), :, 0, 0].max(axis=0) for g in range(4)])
    np.testing.assert_allclose(kernel_input_max(regions["n"]), expected, rtol=1e-6)
    assert sink.groups == 4
