"""Compile a quantized model with TVM and run the result: the TVM side of the artifact.

`compile_model` lowers (`qcompiler.backends.tvm.lower`) and builds one shared library,
``model.so``, with the weights inside it as constants; `TVMSession` loads it and runs it
with the Relax VM behind the same ``run(names, feeds)`` interface as an onnxruntime
session, so ``qcompile run`` and ``qcompile bench`` treat both artifacts alike. The
library serves any shape (one entry, ``main``, with the model's dynamic dimensions
symbolic: prompts and decode steps of a causal LM alike), or is specialized to static
input shapes, one entry function per shape (several shapes, e.g. sequence-length buckets,
share one library and one copy of the weights: TVM stores identical constants once). The
shapes are recorded in the manifest; each call runs the entry its inputs match, and inputs
that match none are refused in one sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import tvm
from tvm import relax

from qcompiler.backend import Lowering
from qcompiler.backends.tvm import cpu_schedule
from qcompiler.backends.tvm.backend import ANY, TARGETS
from qcompiler.backends.tvm.int4_matmul import default_target
from qcompiler.backends.tvm.lower import fuse_quantized_linears, generalize, specialize, to_relax
from qcompiler.decoding import MASK, TOKENS, cache_layout
from qcompiler.errors import QCompilerError


class SymbolicImportError(QCompilerError):
    """TVM's importer lost a symbolic shape: the model builds only for fixed shapes."""


@dataclass
class Built:
    executable: tvm.runtime.Executable
    lowering: Lowering
    signature: dict  # {"entries": {label: {"function", "inputs": {name: {"shape", "dtype"}}}}, "outputs", "target"}


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise QCompilerError(f"TVM target '{target}' is not supported yet; the TVM backend's kernels are written for "
                             f"CPUs ({', '.join(TARGETS)}).")


Shapes = Mapping[str, tuple[int, ...]]


def compile_model(model: ir.Model, shapes: Shapes | Sequence[Shapes] | None, target: str = "llvm") -> Built:
    """Lower and build a copy of ``model`` for static input ``shapes`` (one set, or several: one entry each).

    ``shapes=None`` builds one entry for any shape: the model's dynamic dimensions stay
    symbolic (`lower.generalize`), and the kernels branch on M at run time.
    """
    check_target(target)
    if shapes is None:
        work = _copy(model)
        lowering = fuse_quantized_linears(work)
        dims = generalize(work)
        try:
            module = to_relax(work, None)
        except (tvm.error.InternalError, AttributeError, ValueError) as exc:  # TVM 0.27's converters on sizes
            first = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
            raise SymbolicImportError(f"TVM's importer cannot keep this model's shapes symbolic ({first}), so it "
                                      "cannot build one library for any shape; build it for fixed shapes with "
                                      "--shape BATCHxSEQUENCE.") from exc
        entries = {ANY: {"function": "main", "inputs": {
            v.name: {"shape": dims[v.name], "dtype": v.dtype.numpy().name}
            for v in work.graph.inputs if v.name not in work.graph.initializers}, "totals": _totals(model, dims)}}
        return _build(module, lowering, entries, [v.name for v in work.graph.outputs])
    shape_sets = [dict(shapes)] if isinstance(shapes, Mapping) else [dict(s) for s in shapes]
    module, entries, outputs = tvm.IRModule(), {}, []
    for shape_set in shape_sets:
        label = "x".join(str(d) for d in next(iter(shape_set.values())))
        if label in entries:
            raise QCompilerError(f"The shape {label} is given twice; give each shape once.")
        work = _copy(model)
        lowering = fuse_quantized_linears(work)
        specialize(work, shape_set)
        part = to_relax(work, shape_set, suffix=f"_{label}")
        function = f"main_{label}"
        main = part["main"].with_attr("global_symbol", function)
        module.update(tvm.IRModule({**{var: f for var, f in part.functions_items() if var.name_hint != "main"},
                                    tvm.ir.GlobalVar(function): main}))
        entries[label] = {"function": function,
                          "inputs": {v.name: {"shape": list(shape_set[v.name]), "dtype": v.dtype.numpy().name}
                                     for v in work.graph.inputs if v.name not in work.graph.initializers}}
        outputs = [v.name for v in work.graph.outputs]
    return _build(module, lowering, entries, outputs)


def _copy(model: ir.Model) -> ir.Model:
    """A copy to lower whose weights stored as external data stay readable (a serialized copy loses their folder)."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    for name, value in copy.graph.initializers.items():
        original = model.graph.initializers[name].const_value
        if isinstance(original, ir.ExternalTensor):
            value.const_value = original
    return copy


def _totals(model: ir.Model, dims: Mapping[str, list]) -> dict[str, list[str]]:
    """A decoder's mask length as the sum it must be: ``{total: [past, sequence]}`` (empty for other models).

    The graph never checks it, and TVM reads past the end of a tensor that is shorter than
    the sum, so the session checks it before a call.
    """
    layout = cache_layout(model)
    if layout is None or not layout.has_mask:
        return {}
    total, past, sequence = dims[MASK][1], dims[layout.past(0, "key")][2], dims[TOKENS][1]
    return {total: [past, sequence]} if all(isinstance(d, str) for d in (total, past, sequence)) else {}


def _build(module: tvm.IRModule, lowering: Lowering, entries: dict, outputs: list[str]) -> Built:
    host = default_target()
    executable = tvm.compile(module, host, relax_pipeline=cpu_schedule.pipeline(host))
    return Built(executable, lowering, {"entries": entries, "outputs": outputs, "target": str(host)})


def entries(signature: dict) -> dict[str, dict]:
    """The library's entry functions by shape label (a manifest from before entries had one, ``main``)."""
    return signature.get("entries") or {"": {"function": "main", "inputs": signature["inputs"]}}


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
        self._entries, self._outputs = entries(signature), list(signature["outputs"])
        self._inputs = list(next(iter(self._entries.values()))["inputs"])

    def get_inputs(self) -> list[_Named]:
        return [_Named(name) for name in self._inputs]

    def get_outputs(self) -> list[_Named]:
        return [_Named(name) for name in self._outputs]

    def run(self, names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        missing = [name for name in self._inputs if name not in feeds]
        if missing:
            raise QCompilerError(f"Input '{missing[0]}' is missing.")
        arrays = {name: np.asarray(feeds[name]) for name in self._inputs}
        entry = next((e for e in self._entries.values() if _matches(arrays, e["inputs"])), None)
        if entry is not None:
            _check_totals(arrays, entry)
        if entry is None:
            given = _describe({name: {"dtype": a.dtype.name, "shape": list(a.shape)} for name, a in arrays.items()})
            built = " or ".join(_describe(e["inputs"]) for e in self._entries.values())
            raise QCompilerError(f"The inputs are {given}, but this TVM library was built for {built}; "
                                 "compile again with that shape in --shape.")
        arguments = [tvm.runtime.tensor(np.ascontiguousarray(arrays[name]), self._device) for name in entry["inputs"]]
        result = self._vm[entry["function"]](*arguments)
        values = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
        by_name = {name: value.numpy() for name, value in zip(self._outputs, values)}
        return [by_name[name] for name in (names or self._outputs)]


def _matches(arrays: Mapping[str, np.ndarray], inputs: Mapping[str, dict]) -> bool:
    """Whether the arrays have the entry's dtypes and shapes; a named (symbolic) dimension is one size throughout."""
    sizes: dict[str, int] = {}
    for name, spec in inputs.items():
        array = arrays[name]
        if array.dtype.name != spec["dtype"] or array.ndim != len(spec["shape"]):
            return False
        for size, dim in zip(array.shape, spec["shape"]):
            if isinstance(dim, str):
                if sizes.setdefault(dim, size) != size:
                    return False
            elif size != dim:
                return False
    return True


def _check_totals(arrays: Mapping[str, np.ndarray], entry: dict) -> None:
    sizes = {dim: size for name, spec in entry["inputs"].items() for dim, size in zip(spec["shape"], arrays[name].shape)
             if isinstance(dim, str)}
    for total, parts in entry.get("totals", {}).items():
        if sizes[total] != sum(sizes[part] for part in parts):
            raise QCompilerError(f"The attention mask covers {sizes[total]} tokens, but the cache holds "
                                 f"{sizes[parts[0]]} and the input {sizes[parts[1]]} new ones; give a mask for "
                                 f"all {sum(sizes[part] for part in parts)}.")


def _describe(inputs: Mapping[str, dict]) -> str:
    """``int64 [2, 16]`` when every input has that dtype and shape, else each input's."""
    kinds = {(spec["dtype"], tuple(spec["shape"])) for spec in inputs.values()}
    if len(kinds) == 1:
        dtype, shape = next(iter(kinds))
        return f"{dtype} {list(shape)}"
    return "(" + ", ".join(f"{name} {spec['dtype']} {spec['shape']}" for name, spec in inputs.items()) + ")"
