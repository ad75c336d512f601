"""Per-region views of calibration data: which tensors a region's sinks read, and
reductions from sink channels back to the producer's channels (through each sink's
channel map, so GQA-shared heads and split channels land on the channel that made them).
"""

from __future__ import annotations

import numpy as np

from qcompiler.analysis.linears import constant_array
from qcompiler.analysis.regions import Region


def sink_inputs(regions: list[Region]) -> list[str]:
    """Names of the tensors the sinks of ``regions`` read, each once."""
    return list(dict.fromkeys(sink.linear.input.name for region in regions for sink in region.sinks))


def producer_channel_max(region: Region, per_sink: dict[str, np.ndarray]) -> np.ndarray:
    """Per producer channel, the max over every sink channel it feeds of a per-sink-channel vector."""
    result = np.zeros(region.channels)
    for sink in region.sinks:
        np.maximum.at(result, sink.channel_map, per_sink[sink.linear.input.name])
    return result


def weight_row_max(region: Region) -> np.ndarray:
    """Per producer channel, the largest |weight| in the rows of every sink that read it."""
    result = np.zeros(region.channels)
    for sink in region.sinks:
        np.maximum.at(result, sink.channel_map, np.abs(constant_array(sink.linear.weight)).max(axis=1))
    return result
