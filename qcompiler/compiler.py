"""The end-to-end job: load, calibrate, run the pipeline, lower for a backend, write the artifact.

`compile` is what ``qcompile MODEL ...`` calls. It orchestrates and nothing more: the
calibration data is resolved by `qcompiler.calibration.resolve`, passes run under the
`PassManager`, the backend (`qcompiler.backend`) lowers, and `qcompiler.artifact` writes
the directory atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import onnx
import onnx_ir as ir

from qcompiler import artifact
from qcompiler.backend import Backend, LowerContext, Lowering, make_backend
from qcompiler.calibration import data as calib_data
from qcompiler.calibration.data import CalibrationData
from qcompiler.calibration.engine import DEFAULT_MEMORY_BUDGET, parse_memory
from qcompiler.calibration.resolve import resolve_calibration
from qcompiler.capture import load
from qcompiler.errors import QCompilerBug, blame_qcompiler
from qcompiler.decoding import cache_layout, refill
from qcompiler.evaluation import embedding_metrics
from qcompiler.next_token import next_token_metrics
from qcompiler.pass_api import Pass
from qcompiler.pass_manager import DEFAULT_TOLERANCE, PassManager
from qcompiler.pipeline import parse_pipeline
from qcompiler.plots import ChannelTrace
from qcompiler.progress import logger
from qcompiler.quant.annotation import annotated_layers
from qcompiler.quant.sensitivity import SensitivityRow
from qcompiler.report import Report
from qcompiler.runtime import weight_bytes
from qcompiler.summary import embedding_bytes, summary_lines
from qcompiler.verify import compare_outputs

NORMALIZE = "normalize"


@dataclass
class CompileResult:
    model: ir.Model
    report: Report
    output: Path | None
    manifest: dict | None = None


def compile(
    model: Any,
    passes: str | Sequence[Pass | str] | None = None,
    *,
    example_inputs: Any = None,
    calib: Any = None,
    tokenizer: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    force: bool = False,
    normalize: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    verify: bool = True,
    batch_size: int = 8,
    max_length: int = 128,
    max_memory: int | str | None = None,
    progress: bool = False,
    backend: str | Backend = "ort",
    log: Callable[[str], None] = logger.info,
    **backend_options: Any,
) -> CompileResult:
    """Load ``model``, run ``passes`` (after normalization), lower for ``backend``, write ``output`` if given.

    ``model`` is anything `qcompiler.load` takes; a `torch.nn.Module` needs ``example_inputs``
    (a tuple of tensors or a dict of keyword tensors), from which it is captured with
    dynamic batch and sequence axes.

    ``backend`` is a registered backend's name (``ort``, the default: onnxruntime's integer
    kernels; ``tvm``: ``model.so`` with qcompiler's TIR kernels; ``compressed-tensors``: a
    Hugging Face checkpoint beside the simulate model; ``simulate``: the quantize pass's
    float Q/DQ form, for fidelity studies) or a `Backend` object; ``backend_options`` are
    that backend's options, e.g. ``dialect="qdq"`` for ``ort`` (standard ONNX Q/DQ instead
    of contrib ops), ``shape=(1, 128)`` or ``shape=[(1, 32), (1, 128)]`` and ``target`` for
    ``tvm``.

    ``max_memory`` (bytes, or ``"8G"``) bounds what calibration holds at once: the
    activations exposed per run over the data, and GPTQ's and EoRA's ``X^T X`` (gathered
    in as many runs as the bound needs; default 2 GiB). The weights are not bounded yet.
    """
    chosen = make_backend(backend, **backend_options)
    budget = DEFAULT_MEMORY_BUDGET if max_memory is None else parse_memory(max_memory)
    output_dir = Path(output) if output is not None else None
    if output_dir is not None:
        artifact.check_output_dir(output_dir, force)
    pipeline = parse_pipeline(passes)
    if normalize and not (pipeline and pipeline[0].name == "convert-opset"):
        pipeline = parse_pipeline(NORMALIZE) + pipeline
    source = model if isinstance(model, (str, os.PathLike)) else type(model).__name__
    ir_model = load(model, example_inputs)
    chosen.accepts(ir_model)
    source_bytes = weight_bytes(ir_model)
    data = resolve_calibration(calib, ir_model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    trace = ChannelTrace(list(pipeline)) if output_dir is not None and data is not None else None
    manager = PassManager(pipeline, calibration=data, tolerance=tolerance, verify=verify, memory_budget=budget,
                          progress=progress, log=log, after_pass=trace)
    report = manager.run(ir_model, source=str(source))
    if data is not None and calib is None:
        report.notes.append("calibrated on qcompiler's built-in sentences (no calibration data given)")
    lowered = chosen.lower(ir_model, LowerContext(manager.holdout, log))
    report.notes.extend(lowered.notes)
    with blame_qcompiler(f"in the {chosen.name} lowering"):
        fidelity = _fidelity(manager, lowered.model)
    details = artifact.manifest(source=model if isinstance(model, (str, os.PathLike)) else source,
                                pipeline=report.pipeline, backend=chosen.name,
                                layers=_layers(lowered.model, lowered.lowering), fidelity=fidelity, notes=report.notes)
    details.update(lowered.manifest)
    details.update(artifact.io_signature(lowered.model))
    details["weight_bytes"] = {"source": source_bytes, "artifact": weight_bytes(lowered.model),
                               "embeddings": embedding_bytes(lowered.model)}
    details["summary"] = summary_lines(report, details["weight_bytes"])
    ranking = report.findings(SensitivityRow)
    if ranking:
        details["sensitivity"] = [vars(row) for row in ranking]
    if output_dir is not None:
        artifact.write(output_dir, lowered, report, details, trace, force=force,
                       validate=_validator(chosen, details, manager.holdout))
    return CompileResult(lowered.model, report, output_dir, details)


def _validator(backend: Backend, manifest: dict, holdout: CalibrationData | None) -> Callable[[Path], None]:
    """Check a staged artifact as its user will meet it: the full ONNX checker, the backend's session, one batch.

    The model is qcompiler's output, so whatever fails here is qcompiler's fault (exit 1),
    never the input's. The batch is the first held-out one, run only where the artifact
    takes its shape (a static-shape library may not).
    """
    def validate(folder: Path) -> None:
        try:
            onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
            model = ir.load(folder / "model.onnx")
            session = backend.session(folder, manifest, model)
            batch = holdout.batches[0] if holdout is not None and holdout.batches else None
            layout = cache_layout(model)
            if batch is not None and layout is not None:
                batch = refill(layout, batch)
            static = backend.bench_shape(manifest)
            if batch is not None and (static is None or next(iter(batch.values())).shape[:2] == tuple(static)):
                session.run(None, batch)
        except Exception as exc:
            first = next(iter(str(exc).strip().splitlines()), "") or type(exc).__name__
            raise QCompilerBug(f"qcompiler produced an invalid artifact ({first}); nothing was written; please "
                               "report it with the --debug traceback") from exc

    return validate


def _fidelity(manager: PassManager, model: ir.Model) -> dict | None:
    """The compiled model against the model as given, on the held-out calibration batches."""
    if manager.reference_outputs is None or manager.holdout is None:
        return None
    compiled = manager.outputs(model)
    batches = manager.holdout.batches
    # Compared at real tokens: padding positions compute values nothing downstream reads.
    outputs = compare_outputs(calib_data.real_token_runs(manager.reference_outputs, batches),
                              calib_data.real_token_runs(compiled, batches))
    fidelity = {"holdout_batches": len(manager.holdout), "outputs": outputs, "embedding": None}
    if cache_layout(model) is not None:  # a causal LM: its logits are next-token distributions, not embeddings
        fidelity["next_token"] = next_token_metrics(manager.reference_outputs, compiled, manager.holdout.batches)
    else:
        fidelity["embedding"] = embedding_metrics(list(outputs), manager.reference_outputs, compiled,
                                                  manager.holdout.batches)
    return fidelity


def _layers(model: ir.Model, lowering: Lowering) -> dict[str, dict]:
    """Per quantized layer: its scheme and what runs it."""
    return {a.layer: {"preset": a.preset, "scheme": a.scheme.describe(), "weight_sqnr_db": a.weight_sqnr_db,
                      **lowering.runs_as(a.layer)} for _, a in annotated_layers(model)}
