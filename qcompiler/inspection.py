"""`qcompile inspect`: what is in a model and where its activation outliers are.

Five tables: op counts, every linear (and convolution) with its shapes, the regions (which producer
absorbs which channel transform offline, and why the others are refused; the regions a
CNN's convolutions read, when it has any), the residual
streams (writers, readers, and whether rotate can turn the whole stream offline), and
(given calibration data) one row per distinct linear input with the max/median ratio of
per-channel absmax and the kurtosis of its values: the two numbers that say whether
per-tensor activation quantization will struggle there.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import onnx_ir as ir
from rich.table import Table

from qcompiler.analysis.conv_regions import ConvRegion, find_conv_regions
from qcompiler.analysis.convolutions import find_convolutions
from qcompiler.analysis.linears import Linear, find_linears
from qcompiler.analysis.regions import CAPABILITIES, Region, find_regions
from qcompiler.analysis.residual import CENTER, ROTATE, Stream, find_streams
from qcompiler.calibration.engine import CalibrationEngine
from qcompiler.calibration.stats import TensorStats


@dataclass
class OutlierRow:
    tensor: str
    sinks: list[str]
    stats: TensorStats


def op_summary(model: ir.Model) -> collections.Counter:
    return collections.Counter(
        node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}" for node in model.graph
    )


def linear_inputs(linears: list[Linear]) -> dict[str, list[Linear]]:
    """Linears grouped by the activation tensor they read, in graph order."""
    groups: dict[str, list[Linear]] = {}
    for linear in linears:
        groups.setdefault(linear.input.name, []).append(linear)
    return groups


def outlier_rows(model: ir.Model, engine: CalibrationEngine) -> list[OutlierRow]:
    groups = linear_inputs(find_linears(model.graph))
    stats = engine.collect(model, list(groups))
    return [OutlierRow(name, [l.layer for l in sinks], stats[name]) for name, sinks in groups.items()]


def op_table(model: ir.Model) -> Table:
    table = Table(title="ops", title_justify="left")
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, count in op_summary(model).most_common():
        table.add_row(op, str(count))
    return table


def linear_table(model: ir.Model, verbose: bool = False) -> Table:
    """Every linear by module path (what ``skip=``/``override=`` and the reports use); node names with ``verbose``."""
    table = Table(title="linears (y = x W + b)", title_justify="left")
    headers = ("linear", *(("node", "input") if verbose else ()), "in", "out", "bias")
    for header in headers:
        table.add_column(header, justify="right" if header in ("in", "out") else "left")
    for linear in find_linears(model.graph):
        names = (linear.name, linear.input.name) if verbose else ()
        table.add_row(linear.layer, *names, str(linear.in_features), str(linear.out_features),
                      "yes" if linear.bias is not None else "no")
    return table


def convolution_table(model: ir.Model) -> Table | None:
    """The convolutions the quantize passes take (None when the model has none, to keep transformer output short)."""
    convolutions = find_convolutions(model.graph)
    if not convolutions:
        return None
    table = Table(title="convolutions (quantized per output channel)", title_justify="left")
    for header in ("conv", "input", "in", "out", "kernel", "groups"):
        table.add_column(header, justify="right" if header in ("in", "out", "groups") else "left")
    for conv in convolutions:
        table.add_row(conv.name, conv.input.name, str(conv.in_channels), str(conv.kernel_shape[0]),
                      "x".join(str(d) for d in conv.kernel_shape[2:]), str(conv.groups))
    return table


def region_table(regions: list[Region], verbose: bool = False) -> Table:
    """Regions grouped by kind, what they absorb and why the rest is refused (one row each with ``verbose``)."""
    title = ("regions (offline = absorbed into weights, or into a Mul/Add after an online Hadamard; refused ones run "
             "online or not at all)")
    table = Table(title=title, title_justify="left")
    if verbose:
        for header in ("region", "kind", "producer", "sinks", "offline", "refused"):
            table.add_column(header)
        for region in regions:
            table.add_row(region.name, region.kind, region.producer_label,
                          ", ".join(s.linear.layer for s in region.sinks), _absorbed(region), _refused(region))
        return table
    groups: dict[tuple[str, str, str], list[Region]] = {}
    for region in regions:
        groups.setdefault((region.kind, _absorbed(region), _refused(region)), []).append(region)
    for header in ("kind", "regions", "offline", "refused", "sinks (first region)"):
        table.add_column(header, justify="right" if header == "regions" else "left")
    for (kind, absorbed, refused), members in groups.items():
        table.add_row(kind, str(len(members)), absorbed, refused, ", ".join(s.linear.layer for s in members[0].sinks))
    table.caption = "--verbose lists every region"
    return table


def conv_region_table(regions: list[ConvRegion], verbose: bool = False) -> Table | None:
    """The regions whose sinks are convolutions, grouped by kind and outcome (None when the model has none)."""
    if not regions:
        return None
    table = Table(title="convolution regions (per-channel scale and shift, absorbed along axis 1)", title_justify="left")
    headers = ("region", "kind", "producer", "sinks", "offline", "refused") if verbose else (
        "kind", "regions", "offline", "refused", "sinks (first region)")
    for header in headers:
        table.add_column(header, justify="right" if header == "regions" else "left")
    if verbose:
        for region in regions:
            table.add_row(region.name, region.kind, region.producer_label, ", ".join(s.name for s in region.sinks),
                          _offline(region), _refused(region))
        return table
    groups: dict[tuple[str, str, str], list[ConvRegion]] = {}
    for region in regions:
        groups.setdefault((region.kind, _offline(region), _refused(region)), []).append(region)
    for (kind, offline, refused), members in groups.items():
        table.add_row(kind, str(len(members)), offline, refused, ", ".join(s.name for s in members[0].sinks))
    table.caption = "--verbose lists every region"
    return table


def _offline(region: Region | ConvRegion) -> str:
    return ",".join(c for c in CAPABILITIES if region.can(c)) or "-"


def conv_region_dict(region: ConvRegion) -> dict:
    return {"tensor": region.name, "kind": region.kind, "producer": region.producer_label,
            "sinks": [s.name for s in region.sinks], "channels": region.channels,
            "offline": [c for c in CAPABILITIES if region.can(c)], "refused": dict(region.refused),
            "outside_readers": len(region.foreign)}


def _refused(region: Region | ConvRegion) -> str:
    reasons = set(region.refused.values())
    if len(region.refused) == len(CAPABILITIES) and len(reasons) == 1:
        return f"all: {reasons.pop()}"
    return "; ".join(f"{c}: {why}" for c, why in region.refused.items()) or "-"


def _absorbed(region: Region) -> str:
    """The transforms a region absorbs; behind an online Hadamard they cost an elementwise op after it."""
    able = _offline(region)
    return f"{able} (Mul/Add after the Hadamard)" if region.online is not None else able


def region_dict(region: Region) -> dict:
    return {
        "tensor": region.name, "kind": region.kind, "producer": region.producer_label,
        "sinks": [s.linear.layer for s in region.sinks], "sink_nodes": [s.linear.name for s in region.sinks],
        "channels": region.channels,
        "offline": [c for c in CAPABILITIES if region.can(c)], "refused": dict(region.refused),
        "outside_readers": len(region.foreign),
    }


def stream_table(streams: list[Stream]) -> Table:
    table = Table(title="residual streams (rotated offline as a whole, or refused as a whole)", title_justify="left")
    for header in ("stream", "channels", "writers", "readers", "rotate", "layernorm -> rmsnorm"):
        table.add_column(header)
    for stream in streams:
        row = stream_dict(stream)
        table.add_row(stream.name, str(stream.channels), ", ".join(row["writers"]), ", ".join(row["readers"]),
                      row[ROTATE], row[CENTER])
    return table


def stream_dict(stream: Stream) -> dict:
    return {
        "stream": stream.name, "channels": stream.channels,
        "writers": [f"{w.label} ({w.kind})" for w in stream.writers],
        "readers": [f"{r.label} ({r.kind})" for r in stream.readers],
        ROTATE: stream.refused.get(ROTATE, "admissible"), CENTER: stream.refused.get(CENTER, "admissible"),
    }


def outlier_table(rows: list[OutlierRow]) -> Table:
    table = Table(title="linear inputs: activation outliers", title_justify="left")
    for header in ("tensor", "sinks", "channels", "absmax", "max/median ch", "kurtosis", "p99.9 |x|"):
        table.add_column(header, justify="left" if header in ("tensor",) else "right")
    for row in rows:
        s = row.stats
        table.add_row(row.tensor, str(len(row.sinks)), str(s.channels), f"{float(s.absmax.max()):.3g}",
                      f"{s.channel_outlier_ratio:.1f}", f"{s.kurtosis:.1f}", f"{s.percentile(99.9):.3g}")
    return table


def inspection_dict(model: ir.Model, rows: list[OutlierRow] | None) -> dict:
    """The same content as the tables, for ``--json``."""
    return {
        "ops": dict(op_summary(model)),
        "linears": [
            {"layer": l.layer, "name": l.name, "input": l.input.name, "in": l.in_features, "out": l.out_features,
             "bias": l.bias is not None}
            for l in find_linears(model.graph)
        ],
        "convolutions": [
            {"name": c.name, "input": c.input.name, "in": c.in_channels, "out": c.kernel_shape[0],
             "kernel": list(c.kernel_shape[2:]), "groups": c.groups}
            for c in find_convolutions(model.graph)
        ],
        "regions": [region_dict(r) for r in find_regions(model.graph).regions],
        "conv_regions": [conv_region_dict(r) for r in find_conv_regions(model.graph)],
        "streams": [stream_dict(s) for s in find_streams(model.graph)],
        "outliers": [{"tensor": r.tensor, "sinks": r.sinks, **r.stats.summary()} for r in rows or []],
    }
