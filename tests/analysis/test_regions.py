"""Region analysis: the same code finds the regions of every architecture, with no name tables."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from rich.console import Console

from qcompiler.analysis.regions import ONLINE_ROTATION, ROTATE, SCALE, SHIFT, find_regions
from qcompiler.inspection import region_table
from qcompiler.pass_manager import PassManager
from qcompiler.pipeline import parse_pipeline

# kind -> count, per architecture (2 layers; MiniLM has 6 plus the pooler).
EXPECTED_REGIONS = {
    "llama": {"rmsnorm": 5, "attention": 2, "gated": 2},
    "qwen2": {"rmsnorm": 5, "attention": 2, "gated": 2},
    "gpt2": {"layernorm": 5, "attention": 2, "unabsorbable": 2},
    "opt": {"layernorm": 5, "attention": 2, "linear": 2},
    "bert": {"layernorm": 5, "attention": 2, "unabsorbable": 2},
    "vit": {"layernorm": 5, "attention": 2, "unabsorbable": 2},
    "minilm": {"layernorm": 13, "attention": 6, "unabsorbable": 6},
}


@pytest.mark.parametrize("arch", sorted(EXPECTED_REGIONS))
def test_region_kinds_per_architecture(normalized_files, arch):
    regions = find_regions(ir.load(normalized_files(arch)).graph).regions
    assert dict(collections.Counter(r.kind for r in regions)) == EXPECTED_REGIONS[arch]
    for region in regions:
        assert region.sinks, region.name
        if region.kind == "unabsorbable":
            assert region.capabilities == frozenset() and set(region.refused) == {SCALE, SHIFT, ROTATE}
        else:
            assert SCALE in region.capabilities, (region.name, region.refused)


def test_post_norm_bert_regions_have_outside_readers(normalized_files):
    regions = find_regions(ir.load(normalized_files("minilm")).graph).of_kind("layernorm")
    # Every MiniLM LayerNorm output also feeds a residual Add or is the graph output.
    assert all(r.foreign for r in regions)
    assert all("read outside" in r.refused[ROTATE] or "LayerNorm" in r.refused[ROTATE] for r in regions)


def test_grouped_query_attention_maps_each_query_head_to_its_kv_head(normalized_files):
    (region, *_) = find_regions(ir.load(normalized_files("llama")).graph).of_kind("attention")
    (sink,) = region.sinks
    head_dim, heads, kv_heads = 16, 4, 2
    assert region.head_dim == head_dim and region.channels == kv_heads * head_dim
    expected = np.array([(h // (heads // kv_heads)) * head_dim + d for h in range(heads) for d in range(head_dim)])
    np.testing.assert_array_equal(sink.channel_map, expected)
    assert ROTATE in region.capabilities and SHIFT not in region.capabilities


def test_gpt2_fused_qkv_split_maps_o_proj_to_the_value_third(normalized_files):
    (region, *_) = find_regions(ir.load(normalized_files("gpt2")).graph).of_kind("attention")
    assert region.channels == 3 * 64
    np.testing.assert_array_equal(region.sinks[0].channel_map, np.arange(128, 192))


def test_relu_region_allows_scales_only(normalized_files):
    for region in find_regions(ir.load(normalized_files("opt")).graph).of_kind("linear"):
        assert region.capabilities == frozenset({SCALE})
        assert "ReLU" in region.refused[SHIFT]


def _linear_on_graph_input() -> ir.Model:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [weight])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def test_rejected_candidates_say_why():
    (region,) = find_regions(_linear_on_graph_input().graph).regions
    assert region.kind == "unabsorbable"
    assert region.refused[SCALE] == "producer is a graph input"


# After rotate: the FFN-internal activations (gated products, GELU/ReLU outputs) sit behind online Hadamards.
AFTER_ROTATE = {
    "llama": {"rmsnorm": 5, "attention": 2, "online-rotation": 2},
    "gpt2": {"rmsnorm": 5, "attention": 2, "online-rotation": 2},
}


@pytest.mark.parametrize("arch", sorted(AFTER_ROTATE))
def test_online_hadamard_is_a_region_that_absorbs_scales_and_shifts(normalized_files, arch):
    model = ir.load(normalized_files(arch))
    PassManager(parse_pipeline("rotate"), verify=False, progress=False).run(model)
    regions = find_regions(model.graph).regions
    assert dict(collections.Counter(r.kind for r in regions)) == AFTER_ROTATE[arch]
    for region in find_regions(model.graph).of_kind(ONLINE_ROTATION):
        assert region.capabilities == frozenset({SCALE, SHIFT}) and "already rotated" in region.refused[ROTATE]
        assert region.online.hadamard is region.producer and region.online.output is region.source
        assert "Hadamard" in region.producer_label
    console = Console(record=True, width=400)
    console.print(region_table(regions, verbose=True))  # one row per region
    assert console.export_text().count("scale,shift (Mul/Add after the Hadamard)") == AFTER_ROTATE[arch][ONLINE_ROTATION]
