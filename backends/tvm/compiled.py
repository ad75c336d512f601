"""A kernel compiled for one shape, callable from numpy with its packed weights kept resident.

The int4, int8 and W4A8 kernels are each benchmarked and tested on their own, outside a
model: every call copies its activations in and its result out, and must not copy the
weights again (16 MiB for a 4096 x 4096 int8 matrix), so weights are uploaded once,
checked against the shapes this build expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import tvm

Weights = Mapping[str, np.ndarray | tvm.runtime.Tensor]


@dataclass
class CompiledKernel:
    executable: tvm.runtime.Executable

    def __post_init__(self) -> None:
        self._main = self.executable["main"]
        self._device = tvm.cpu()

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each packed weight's name and the shape this build needs, in the kernel's argument order."""
        raise NotImplementedError

    def upload(self, weights: Weights) -> dict[str, tvm.runtime.Tensor]:
        """The packed weights as TVM tensors, after checking their shapes against this build."""
        expected = self.weight_shapes()
        for name, shape in expected.items():
            if tuple(weights[name].shape) != shape:
                raise ValueError(f"{name} is {tuple(weights[name].shape)}, this kernel needs {shape}")
        return {name: value if isinstance(value := weights[name], tvm.runtime.Tensor)
                else tvm.runtime.tensor(np.ascontiguousarray(value), self._device) for name in expected}

    def _run(self, weights: Weights, before: list[np.ndarray], after: list[np.ndarray],
             out_shape: tuple[int, int]) -> np.ndarray:
        """``main(*before, *weights, *after, Y)`` with numpy arrays copied in and ``Y`` copied out."""
        resident = self.upload(weights)
        arrays = [tvm.runtime.tensor(np.ascontiguousarray(a), self._device) for a in (*before, *after)]
        y = tvm.runtime.empty(out_shape, "float32", self._device)
        self._main(*arrays[:len(before)], *resident.values(), *arrays[len(before):], y)
        return y.numpy()
