"""Run an `onnx_ir.Model` in onnxruntime, optionally exposing intermediate tensors.

Intermediate tensors are exposed by appending them to the graph outputs only while the
model is serialized, so the caller's model is never copied or left changed. Models whose
weights would push a single protobuf past its 2 GB limit, or whose weights still live
in external files, are written with external data to a temporary folder and opened from
there, so no oversized ModelProto is built.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qcompiler.errors import QCompilerError

EXACT_MATMULNBITS_KEY = "session.qdq_matmulnbits_accuracy_level"
DISABLE_QDQ_FUSION_KEY = "session.disable_quant_qdq"
# Stay well below protobuf's 2 GB ceiling: above this, weights go to external data.
INLINE_LIMIT_BYTES = 1_500_000_000
# Above this, a session loads its model from a scratch file with external data instead of from
# serialized bytes: the proto and its bytes are two more copies of every weight at once.
SESSION_INLINE_LIMIT_BYTES = 256 * 2**20
# Sessions' intra-op threads where the caller gives none (0: onnxruntime's default, every core).
# A trial worker sharing the machine with other workers sets 1 (`share_cores`).
_process_threads = 0


def initializer_bytes(model: ir.Model) -> int:
    """Total bytes of the model's initializers (without loading lazy external data)."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += tensor.nbytes
    return total


def weight_bytes(model: ir.Model) -> int:
    """Bytes of the model's constant tensors however stored: initializers and Constant nodes' values.

    Some exporters (the OCR classifier's, for one) keep every weight in a Constant node; counted
    as initializers alone, such a source would weigh nothing.
    """
    total = initializer_bytes(model)
    for node in model.graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = node.attributes.get("value")
            if value is not None and value.type == ir.AttributeType.TENSOR:
                total += value.as_tensor().nbytes
    return total


def has_external_data(model: ir.Model) -> bool:
    """Whether any initializer still lives in an external file (a session from bytes cannot find it)."""
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


@contextlib.contextmanager
def exposed_outputs(model: ir.Model, names: Sequence[str]) -> Iterator[list[str]]:
    """Temporarily add the values called ``names`` to the graph outputs."""
    graph = model.graph
    values = {v.name: v for node in graph for v in node.outputs if v.name}
    values.update({v.name: v for v in graph.inputs})
    present = {v.name for v in graph.outputs}
    added = []
    for name in names:
        if name in present:
            continue
        if name not in values:
            raise QCompilerError(f"The model has no tensor named '{name}'.")
        graph.outputs.append(values[name])
        added.append(values[name])
        present.add(name)
    try:
        yield [v.name for v in graph.outputs]
    finally:
        for value in added:
            graph.outputs.remove(value)


def share_cores(threads: int) -> None:
    """This process is one of several compiling at once: its sessions use ``threads`` and never spin.

    onnxruntime's pool defaults to every core and busy-waits between runs; two workers doing
    that on two cores take turns on each other's cores instead of running side by side.
    """
    global _process_threads
    _process_threads = threads


def make_session(model: ir.Model, extra_outputs: Sequence[str] = (), *, threads: int = 0,
                 spinning: bool = True, fuse_qdq: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``model`` that also returns ``extra_outputs``.

    By default the session computes what the graph says: onnxruntime's QDQ fusion is off.
    That fusion turns a static Q/DQ pair and an int8 weight into a u8 x s8 integer GEMM,
    which on x86 CPUs without VNNI sums pairs of products into saturating 16-bit lanes
    (``vpmaddubsw``): measured on this project's 2-core AVX2 machine, a W8A8 ViT's pooled
    output fell to cosine 0.985 with fusion and stays at 0.9997 without. Verification,
    calibration, sensitivity and ``qcompile eval`` measure the quantization, not that.
    ``fuse_qdq=True`` is for running an artifact as deployed (``qcompile run``/``bench``);
    the ORT backend gives such sessions int8 layouts that do not saturate on the CPU it
    compiles for (`qcompiler.backends.ort.lower`).

    ``spinning=False`` stops idle worker threads from busy-waiting after each run: when
    sessions are timed in turn, a spinning pool takes the cores the next contender needs.
    """
    options = ort.SessionOptions()
    threads = threads or _process_threads
    spinning = spinning and not _process_threads
    if not fuse_qdq:
        options.add_session_config_entry(DISABLE_QDQ_FUSION_KEY, "1")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    # onnxruntime fuses DequantizeLinear(4-bit) + MatMul into MatMulNBits and by default
    # computes it with int8-quantized activations (accuracy level 4); a W4A16 model would
    # silently run as W4A8. Level 0 keeps the float computation the graph describes.
    options.add_session_config_entry(EXACT_MATMULNBITS_KEY, "0")
    if threads:
        options.intra_op_num_threads = threads
    with exposed_outputs(model, extra_outputs):
        try:
            if initializer_bytes(model) < SESSION_INLINE_LIMIT_BYTES and not has_external_data(model):
                data = ir.to_proto(model).SerializeToString()
                return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            with tempfile.TemporaryDirectory(prefix="qcompiler-session-") as folder:
                path = Path(folder) / "model.onnx"
                ir.save(model, path, external_data="model.onnx.data")
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except QCompilerError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise QCompilerError(f"onnxruntime cannot run this model: {first}") from exc


def run_batches(session: ort.InferenceSession, batches: Sequence[Mapping[str, np.ndarray]],
                names: Sequence[str] | None = None) -> list[dict[str, np.ndarray]]:
    """Run every batch, returning ``{output name: array}`` per batch."""
    output_names = list(names) if names is not None else [o.name for o in session.get_outputs()]
    return [dict(zip(output_names, session.run(output_names, dict(feeds)))) for feeds in batches]
