"""The TVM backend: ``model.so`` with qcompiler's TIR kernels for the quantized linears, for any shape or static ones.

TVM is imported only when a library is built or run, so listing backends stays cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import onnx_ir as ir

from qcompiler.backend import Backend, LowerContext, Lowered, Session, register_backend
from qcompiler.decoding import cache_layout
from qcompiler.options import option

LIBRARY = "model.so"
TARGETS = ("llvm",)
ANY = "any"  # the shape option of a library for every shape
FALLBACK_SHAPE = (1, 128)  # (batch, sequence) of a model whose shapes TVM's importer cannot keep symbolic


@dataclass
class TVMOptions:
    target: str = option("llvm", "llvm: this CPU (kernels written for x86 with AVX-512 VNNI; CUDA codegen is not "
                                 "wired yet)")
    shape: Sequence[tuple[int, int]] | str = option(ANY, "'any': one library entry for every batch, sequence and "
                                                     "past length (symbolic); or (batch, sequence) per static entry, "
                                                     "one library for every shape listed, weights stored once")

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"TVM target '{self.target}' is not supported yet; the TVM backend's kernels are written "
                             f"for CPUs ({', '.join(TARGETS)})")
        if self.shape == ANY:
            return
        shapes = [tuple(self.shape)] if self.shape and isinstance(self.shape[0], int) else [tuple(s) for s in self.shape]
        if not shapes or any(len(s) != 2 or not all(isinstance(d, int) and d > 0 for d in s) for s in shapes):
            raise ValueError(f"shape must be (batch, sequence) pairs of positive integers, not {self.shape!r}")
        self.shape = tuple(shapes)


@register_backend
class TVMBackend(Backend):
    name = "tvm"
    summary = "model.so with qcompiler's TIR kernels (int4 W4A16, W4A8 and W8A8 on AVX-512 VNNI)"
    Options = TVMOptions

    def lower(self, model: ir.Model, ctx: LowerContext) -> Lowered:
        """Build the library from a copy; ``model`` stays the simulate form, which model.onnx and eval read."""
        from qcompiler.backends.tvm.build import SymbolicImportError, compile_model
        from qcompiler.benchmarking import synthetic_feeds

        notes, shapes = [], self.options.shape
        if shapes == ANY:
            try:
                built = compile_model(model, None, self.options.target)
            except SymbolicImportError as exc:  # what the library could do before it served any shape
                shapes, notes = (FALLBACK_SHAPE,), [f"{exc} Built for {'x'.join(map(str, FALLBACK_SHAPE))} instead."]
        if shapes == ANY:
            inputs = next(iter(built.signature["entries"].values()))["inputs"]
            notes = [f"TVM library built for {self.options.target}, for any shape: inputs " + ", ".join(
                f"{name} {spec['shape']}" for name, spec in inputs.items())]
        else:
            shape_sets = [{name: array.shape for name, array in synthetic_feeds(model, *rows).items()}
                          for rows in shapes]
            built = compile_model(model, shape_sets, self.options.target)
            notes += [f"TVM library built for {self.options.target} and inputs " + "; ".join(
                ", ".join(f"{name} {list(dims)}" for name, dims in given.items()) for given in shape_sets)]
            if cache_layout(model) is not None:
                notes.append("the TVM library runs the prompt only (an empty KV cache at the built shapes): decoding "
                             "needs the library for any shape (--shape any, the default)")
        return Lowered(model, built.lowering, files={LIBRARY: lambda path: built.executable.export_library(str(path))},
                       manifest={"tvm": built.signature}, notes=notes)

    def session(self, folder: Path, manifest: dict, model: ir.Model, *, threads: int = 0,
                timed: bool = False) -> Session:
        if timed:  # read when TVM starts its pool, which the first library call does
            os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
        from qcompiler.backends.tvm.build import TVMSession

        return TVMSession(Path(folder) / LIBRARY, manifest["tvm"], threads)

    def bench_shape(self, manifest: dict) -> tuple[int, int] | None:
        """The first shape a static-shape library was built for (it runs no other); None for one that runs any."""
        from qcompiler.backends.tvm.build import entries

        first = next(iter(entries(manifest["tvm"]).values()))
        batch, sequence = next(iter(first["inputs"].values()))["shape"][:2]
        if isinstance(batch, str) or isinstance(sequence, str):
            return None
        return batch, sequence
