"""A kernel compiled for one shape, callable from numpy with its packed weights kept resident.

The int4, int8 and W4A8 kernels are each benchmarked and tested on their own, outside a
model, where a call should cost what ``InferenceSession.run`` costs: float32 X in, a new
float32 Y out. So weights are uploaded once (16 MiB for a 4096 x 4096 int8 matrix), checked
against the shapes this build expects, and X and Y are handed to TVM through DLPack
without copies (at M = 1 two ``tvm.runtime.tensor`` copies and a ``numpy()`` copy took
longer than a quarter of the kernel).
"""

from __future__ import annotations

import abc
import math
import mmap
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import tvm

Weights = Mapping[str, np.ndarray | tvm.runtime.Tensor]
ALIGNMENT = 64  # bytes: TVM accepts DLPack tensors only at this alignment


class Resident(tuple):
    """Packed weights already uploaded, in the kernel's argument order (what `CompiledKernel.upload` returns)."""


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on an `ALIGNMENT`-byte boundary."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize  # (np.prod takes 5 us on a tuple)
    raw = np.empty(size + ALIGNMENT, np.uint8)
    start = -raw.__array_interface__["data"][0] % ALIGNMENT
    return raw[start:start + size].view(dtype).reshape(shape)


def huge_page_copy(value: np.ndarray) -> np.ndarray:
    """A copy of ``value`` in page-aligned memory advised for transparent huge pages.

    At M = 1 a kernel streams its weights from memory on every call, and with 4 KiB pages
    (TVM's own allocation) page walks cost: cache-cold, the 4096 x 4096 W4A8 kernel took
    0.54 ms on 4 KiB pages and 0.47 on huge pages, the int8 one 0.81 and 0.68. The mapping is
    private: an anonymous shared one is shmem, which gets no huge pages here.
    """
    buffer = mmap.mmap(-1, max(value.nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux only; elsewhere a plain page-aligned copy
        buffer.madvise(mmap.MADV_HUGEPAGE)
    copy = np.frombuffer(buffer, value.dtype, value.size).reshape(value.shape)
    copy[...] = value
    return copy


def _shared(x: np.ndarray) -> tvm.runtime.Tensor:
    """``x`` as a TVM tensor on the same memory, or on an aligned copy when TVM cannot take it as it is.

    DLPack refuses a strided, misaligned (RuntimeError) or read-only (BufferError) array;
    trying is cheaper than checking first (reading a numpy address takes microseconds).
    """
    try:
        return tvm.runtime.from_dlpack(x)
    except (RuntimeError, BufferError):
        staged = aligned_empty(x.shape, x.dtype)
        staged[...] = x
        return tvm.runtime.from_dlpack(staged)


@dataclass
class CompiledKernel(abc.ABC):
    """``main(X, *weights, Y)`` compiled for ``X`` float32 ``[m, k]`` and ``Y`` float32 ``[m, n]``."""

    executable: tvm.runtime.Executable
    m: int
    k: int
    n: int

    def __post_init__(self) -> None:
        self._main = self.executable["main"]

    @abc.abstractmethod
    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each packed weight's name and the shape this build needs, in the kernel's argument order."""

    def upload(self, weights: Weights) -> Resident:
        """The packed weights as TVM tensors (on huge pages), after checking their shapes against this build."""
        expected = self.weight_shapes()
        for name, shape in expected.items():
            if name not in weights:
                raise ValueError(f"{name} is missing: this kernel takes {', '.join(expected)}")
            if tuple(weights[name].shape) != shape:
                raise ValueError(f"{name} is {tuple(weights[name].shape)}, this kernel needs {shape}")
        return Resident(value if isinstance(value := weights[name], tvm.runtime.Tensor)
                        else tvm.runtime.from_dlpack(huge_page_copy(np.asarray(value))) for name in expected)

    def __call__(self, x: np.ndarray, weights: Weights | Resident) -> np.ndarray:
        """``Y`` for float32 ``x`` ``[m, k]``: a new array each call, written by the kernel in place."""
        x = np.asarray(x, np.float32)
        if x.shape != (self.m, self.k):
            raise ValueError(f"x is {x.shape}, this kernel was built for {(self.m, self.k)}")
        resident = weights if isinstance(weights, Resident) else self.upload(weights)
        y = aligned_empty((self.m, self.n))
        self._main(_shared(x), *resident, tvm.runtime.from_dlpack(y))
        return y
