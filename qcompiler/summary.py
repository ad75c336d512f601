"""The end-of-compile summary: what was quantized, what stayed float and why, what each transform did.

A compile that prints only "wrote ..." and a cosine hides what a user most needs to see:
a CNN where only the classifier head was quantized, or ``smooth`` refusing every region.
These lines are printed on the console after every compile and open ``report.md``; they
are built from the report the passes wrote (``coverage`` of the quantize pass, the done
and refused lists of the transform passes) and the weight bytes before and after, so
they say nothing the report does not hold.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable

import onnx_ir as ir

from qcompiler.report import Report

# Per transform pass's details: the keys listing what it transformed, and those mapping what it refused to why.
DONE_KEYS = ("smoothed", "shifted", "absorbed", "online", "equalized", "folded", "rmsnorm")
REFUSED_KEYS = ("skipped", "refused", "rmsnorm_skipped")
REASONS_SHOWN = 3


def summary_lines(report: Report, weight_bytes: dict[str, int] | None = None) -> list[str]:
    """One line per quantize pass (layers by op type) and per transform pass (regions), then the weight bytes."""
    lines = []
    for record in report.passes:
        details = record.details or {}
        if "coverage" in details:
            lines.append(_coverage_line(record.name, details["coverage"], details.get("kept_8bit", [])))
            lines += _beside_lines(record.name, details)
        elif any(key in details for key in DONE_KEYS):
            lines.append(_transform_line(record.name, details))
    if weight_bytes and weight_bytes.get("source"):
        before, after = weight_bytes["source"], weight_bytes["artifact"]
        line = f"weights: {_size(before)} in the source, {_size(after)} in the artifact ({after / before:.2f}x)"
        if weight_bytes.get("embeddings"):
            line += f", of which embedding tables (kept float) {_size(weight_bytes['embeddings'])}"
        lines.append(line)
    return lines


def embedding_bytes(model: ir.Model) -> int:
    """Bytes of the float tables a Gather reads (token and position embeddings), which no preset quantizes."""
    tables = {id(node.inputs[0]): node.inputs[0] for node in model.graph
              if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].is_initializer()}
    return sum(value.const_value.nbytes for value in tables.values()
               if value.const_value is not None and value.const_value.dtype.is_floating_point())


def _coverage_line(name: str, coverage: dict[str, dict], kept_8bit: list[str]) -> str:
    parts = []
    for op, row in coverage.items():
        total = row["quantized"] + row["float"]
        text = f"{op} {row['quantized']} of {total}"
        if row["float"]:
            text += f" ({_reasons(row['float_reasons'])} stay float)"
        parts.append(text)
    line = f"{name}: quantized " + ("; ".join(parts) if parts else "no matrix or convolution op")
    if kept_8bit:
        line += (f"; kept at 8-bit weights as the final projection: {', '.join(kept_8bit)} "
                 "(head=same quantizes it like the rest)")
    return line


def _beside_lines(name: str, details: dict[str, Any]) -> list[str]:
    """The float work a quantize pass put beside its integer linears: outlier channels, low-rank branches."""
    lines = []
    split = details.get("outliers")
    if split:
        channels = sum(len(entry["float_channels"]) for entry in split["inputs"].values())
        lines.append(f"{name}: outlier split (outliers={split['threshold']:g}): {channels} channels of "
                     f"{len(split['inputs'])} linear inputs run in float, {100 * split['float_share']:.2f}% of the "
                     f"quantized multiply-adds, {_size(split['float_bytes'])} of fp16 rows")
    lowrank = details.get("lowrank")
    if lowrank:
        lines.append(f"{name}: low-rank compensation ({lowrank['method']}, {lowrank['storage']}) beside "
                     f"{lowrank['layers']} linears, {_size(lowrank['bytes'])}")
    return lines


def _transform_line(name: str, details: dict[str, Any]) -> str:
    done = sum(len(details[key]) for key in DONE_KEYS if isinstance(details.get(key), (list, dict)))
    refused: collections.Counter = collections.Counter()
    for key in REFUSED_KEYS:
        value = details.get(key)
        if isinstance(value, dict):
            refused.update(str(reason) for reason in value.values())
        elif isinstance(value, list):
            refused.update(str(item) for item in value)
    streams = details.get("residual") or {}
    rotated = sum(1 for stream in streams.values() if stream.get("rotated"))
    line = f"{name}: {done} transformed"
    if streams:  # why a stream was not rotated names its writers: report.json and inspect list them
        line += f", {rotated} of {len(streams)} residual streams rotated"
    if refused:
        line += f", {sum(refused.values())} refused ({_reasons(refused)})"
    return line


def _reasons(counts: dict[str, int] | collections.Counter) -> str:
    """``3 x reason; 1 x other`` for the most common reasons, then how many more there are."""
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    shown = "; ".join(f"{count} x {reason}" for reason, count in ranked[:REASONS_SHOWN])
    rest = sum(count for _, count in ranked[REASONS_SHOWN:])
    return shown + (f"; {rest} more for other reasons" if rest else "")


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def markdown(lines: Iterable[str]) -> list[str]:
    """The summary as a report.md section."""
    items = [f"- {line}" for line in lines]
    return ["## Summary", "", *items, ""] if items else []
