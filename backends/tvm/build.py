"""Compile a quantized model with TVM and run the result: the TVM side of the artifact.

`compile_model` lowers (`qcompiler.backends.tvm.lower`) and builds one shared library,
``model.so``, with the weights inside it as constants; `TVMSession` loads it and runs it
with the Relax VM behind the same ``run(names, feeds)`` interface as an onnxruntime
session, so ``qcompile run`` and ``qcompile bench`` treat both artifacts alike. The
library is specialized to the input shapes it was built for; they are recorded in the
manifest and checked on every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import tvm
from tvm import relax

from qcompiler.backends.tvm import cpu_schedule
from qcompiler.backends.tvm.int4_matmul import default_target
from qcompiler.backends.tvm.lower import Lowering, fuse_quantized_linears, specialize, to_relax
from qcompiler.errors import QCompilerError

TARGETS = ("llvm",)
LIBRARY = "model.so"


@dataclass
class Built:
    executable: tvm.runtime.Executable
    lowering: Lowering
    signature: dict  # {"inputs": {name: {"shape", "dtype"}}, "outputs": [names], "target": str}


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise QCompilerError(f"TVM target '{target}' is not supported yet; the TVM backend's kernels are written for "
                             f"CPUs ({', '.join(TARGETS)}).")


def compile_model(model: ir.Model, shapes: Mapping[str, tuple[int, ...]], target: str = "llvm") -> Built:
    """Lower and build a copy of ``model`` for static input ``shapes`` (``model`` itself is untouched)."""
    check_target(target)
    work = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    lowering = fuse_quantized_linears(work)
    specialize(work, dict(shapes))
    module = to_relax(work, dict(shapes))
    target_ = default_target()
    executable = tvm.compile(module, target_, relax_pipeline=cpu_schedule.pipeline(target_))
    inputs = {v.name: {"shape": list(shapes[v.name]), "dtype": v.dtype.numpy().name}
              for v in work.graph.inputs if v.name not in work.graph.initializers}
    signature = {"inputs": inputs, "outputs": [v.name for v in work.graph.outputs], "target": str(default_target())}
    return Built(executable, lowering, signature)


@dataclass
class _Named:
    name: str


class TVMSession:
    """A built library behind onnxruntime's session interface (``run``, ``get_inputs``, ``get_outputs``)."""

    def __init__(self, library: str | Path | tvm.runtime.Executable, signature: dict, threads: int = 0) -> None:
        """``threads`` > 0 resizes TVM's thread pool (one per process, so it applies to every TVM session)."""
        if threads:
            tvm.get_global_func("runtime.config_threadpool")(1, threads)
        module = tvm.runtime.load_module(str(library)) if isinstance(library, (str, Path)) else library
        self._device = tvm.cpu()
        self._vm = relax.VirtualMachine(module, self._device)
        self._inputs, self._outputs = signature["inputs"], list(signature["outputs"])

    def get_inputs(self) -> list[_Named]:
        return [_Named(name) for name in self._inputs]

    def get_outputs(self) -> list[_Named]:
        return [_Named(name) for name in self._outputs]

    def run(self, names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        arguments = []
        for name, spec in self._inputs.items():
            if name not in feeds:
                raise QCompilerError(f"Input '{name}' is missing.")
            array = np.asarray(feeds[name])
            if list(array.shape) != spec["shape"] or array.dtype.name != spec["dtype"]:
                raise QCompilerError(f"Input '{name}' is {array.dtype.name} {list(array.shape)}, but this TVM library "
                                     f"was built for {spec['dtype']} {spec['shape']}; compile again with that shape.")
            arguments.append(tvm.runtime.tensor(np.ascontiguousarray(array), self._device))
        result = self._vm["main"](*arguments)
        values = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        by_name = {name: value.numpy() for name, value in zip(self._outputs, values)}
        return [by_name[name] for name in (names or self._outputs)]
