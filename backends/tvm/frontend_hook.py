"""Teach TVM's ONNX importer qcompiler's kernel ops for the length of one import.

TVM's Relax ONNX frontend (checked against apache-tvm 0.27.0.post1) has no public
registration hook for custom operators: ``from_onnx`` looks each op up in the table that
the private ``onnx_frontend._get_convert_map`` returns. This module is the only place
qcompiler touches it; it swaps that function for one that adds the given converters and
puts the original back afterwards, even on error. ``tests/backends/test_tvm_frontend_hook.py``
fails, naming this module, if a TVM release renames it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

from tvm.relax.frontend.onnx import onnx_frontend


@contextlib.contextmanager
def extra_converters(converters: Mapping[str, type]) -> Iterator[None]:
    """Within the block, ``from_onnx`` converts the ops named in ``converters`` with the given classes."""
    original = onnx_frontend._get_convert_map

    def extended() -> dict:
        table = dict(original())
        table.update(converters)
        return table

    onnx_frontend._get_convert_map = extended
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original
