"""The end-to-end job: load, calibrate, run the pipeline, write the output directory.

`compile` is what ``qcompile MODEL ...`` calls. The output directory is written
atomically: everything goes to a temporary sibling directory that is renamed into place
only when complete, so a failure never leaves a partial result, and an existing
directory is refused unless ``force`` is set.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import onnx_ir as ir
from rich.console import Console

from qcompiler import artifact
from qcompiler.calibration import data as calib_data
from qcompiler.calibration.data import CalibrationData
from qcompiler.capture import TOKENIZER_KEY, load, load_tokenizer
from qcompiler.errors import CalibrationError, QCompilerError
from qcompiler.evaluation import embedding_metrics, quantization_annotations
from qcompiler.pass_manager import DEFAULT_TOLERANCE, PassManager
from qcompiler.pipeline import parse_pipeline
from qcompiler.plots import ChannelTrace, write_figures
from qcompiler.registry import Pass
from qcompiler.report import Report
from qcompiler.runtime import INLINE_LIMIT_BYTES, initializer_bytes
from qcompiler.verify import compare_outputs

NORMALIZE = "normalize"


def builtin_sentences(name: str = "calibration") -> list[str]:
    """Sentences shipped with the package: ``calibration`` or ``heldout`` (disjoint sets)."""
    text = resources.files("qcompiler").joinpath("data", f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def model_inputs(model: ir.Model) -> list[str]:
    return [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]


def resolve_calibration(
    calib: str | os.PathLike | CalibrationData | Iterable[dict[str, Any]] | None,
    model: ir.Model,
    *,
    tokenizer: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_length: int = 128,
) -> CalibrationData | None:
    """Turn whatever the user gave as calibration data into validated batches.

    With nothing given, a model that carries a tokenizer is calibrated on the sentences
    shipped with qcompiler; any other model gets no calibration (and no verification).
    """
    if batch_size < 1:
        raise CalibrationError(f"Batch size must be at least 1, not {batch_size}.")
    if calib is None:
        tokenizer_dir = tokenizer or model.metadata_props.get(TOKENIZER_KEY)
        if tokenizer_dir is None:
            return None
        data = calib_data.from_sentences(builtin_sentences(), load_tokenizer(tokenizer_dir), model_inputs(model),
                                         batch_size, max_length, source="built-in calibration sentences")
    elif isinstance(calib, CalibrationData):
        data = calib
    elif isinstance(calib, (str, os.PathLike)):
        path = Path(calib)
        if not path.is_file():
            raise CalibrationError(f"Calibration file '{path}' does not exist.")
        if path.suffix == ".npz":
            data = calib_data.from_npz(path, batch_size)
        else:
            tokenizer_dir = tokenizer or model.metadata_props.get(TOKENIZER_KEY)
            if tokenizer_dir is None:
                raise CalibrationError(
                    f"Text calibration file '{path.name}' needs a tokenizer and the model carries none; "
                    "name one with --tokenizer (a Hugging Face tokenizer folder, or 'minilm')."
                )
            data = calib_data.from_text(path, load_tokenizer(tokenizer_dir), model_inputs(model), batch_size, max_length)
    else:
        data = calib_data.from_iterable(calib)
    calib_data.validate(data, model)
    return data


BACKENDS = ("simulate", "ort", "tvm")
DIALECTS = ("ort", "qdq")


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
    calib: Any = None,
    tokenizer: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    force: bool = False,
    normalize: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    verify: bool = True,
    batch_size: int = 8,
    max_length: int = 128,
    progress: bool = False,
    backend: str = "simulate",
    dialect: str = "ort",
    target: str = "llvm",
    shape: tuple[int, int] | Sequence[tuple[int, int]] = (1, 128),
    log: Callable[[str], None] = lambda message: None,
) -> CompileResult:
    """Load ``model``, run ``passes`` (after normalization), lower for ``backend``, write ``output`` if given.

    ``backend`` is ``simulate`` (the quantize pass's Q/DQ form, which runs everywhere ONNX
    runs) or ``ort`` (onnxruntime's integer kernels where it has them). With ``ort``,
    ``dialect="qdq"`` keeps standard ONNX instead of contrib ops: static int8 Q/DQ and
    blocked 4-bit DequantizeLinear (opset 21), which other runtimes read too. ``tvm`` builds
    ``model.so`` for ``target`` with qcompiler's TIR kernels for the quantized linears, for
    static inputs of ``shape`` = (batch, sequence), or of each of a list of such shapes (one
    library, one entry per shape; fixed dimensions stay as they are); ``model.onnx`` beside it is then the simulate form, which ``qcompile eval`` reads.
    """
    if backend not in BACKENDS:
        raise QCompilerError(f"Unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}.")
    if dialect not in DIALECTS:
        raise QCompilerError(f"Unknown dialect '{dialect}'; choose one of {', '.join(DIALECTS)}.")
    if backend == "tvm":
        from qcompiler.backends.tvm.build import check_target

        check_target(target)
    output_dir = Path(output) if output is not None else None
    if output_dir is not None:
        _check_output_dir(output_dir, force)
    pipeline = parse_pipeline(passes)
    if normalize and not (pipeline and pipeline[0].name == "convert-opset"):
        pipeline = parse_pipeline(NORMALIZE) + pipeline
    source = model if isinstance(model, (str, os.PathLike)) else type(model).__name__
    ir_model = load(model)
    data = resolve_calibration(calib, ir_model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    trace = ChannelTrace(list(pipeline)) if output_dir is not None and data is not None else None
    manager = PassManager(pipeline, calibration=data, tolerance=tolerance, verify=verify, progress=progress, log=log,
                          after_pass=trace)
    report = manager.run(ir_model, source=str(source))
    if data is not None and calib is None:
        report.notes.append("calibrated on qcompiler's built-in sentences (no --calib given)")
    kernels: dict = {}
    built = None
    if backend == "tvm":
        from qcompiler.backends.tvm.build import compile_model
        from qcompiler.benchmarking import synthetic_feeds

        shape_sets = [{name: array.shape for name, array in synthetic_feeds(ir_model, *rows).items()}
                      for rows in ([shape] if isinstance(shape[0], int) else shape)]
        built = compile_model(ir_model, shape_sets, target)
        kernels = built.lowering.to_dict()
        report.notes.append(f"TVM library built for {target} and inputs " + "; ".join(
            ", ".join(f"{name} {list(dims)}" for name, dims in shapes.items()) for shapes in shape_sets))
    elif backend == "ort":
        from qcompiler.backends.ort.lower import lower, qdq_dialect

        kernels = (lower(ir_model) if dialect == "ort" else qdq_dialect(ir_model)).to_dict()
        if dialect == "qdq":
            report.notes.append(
                "qdq dialect: onnxruntime fuses blocked 4-bit DequantizeLinear + MatMul into MatMulNBits at load and by "
                "default computes it with int8 activations; set the session config "
                "'session.qdq_matmulnbits_accuracy_level' to 0 for the W4A16 numbers")
    fidelity = _fidelity(manager, ir_model)
    details = artifact.manifest(source=model if isinstance(model, (str, os.PathLike)) else source,
                                pipeline=report.pipeline, backend=backend, layers=_layers(ir_model, kernels, backend),
                                fidelity=fidelity, notes=report.notes)
    if built is not None:
        details["tvm"] = built.signature
    ranking = [row for record in report.passes for row in record.details.get("sensitivity", [])]
    if ranking:
        details["sensitivity"] = ranking
    if output_dir is not None:
        write_output(ir_model, report, output_dir, force, details, trace,
                     library=built.executable if built is not None else None)
    return CompileResult(ir_model, report, output_dir, details)


def _fidelity(manager: PassManager, model: ir.Model) -> dict | None:
    """The compiled model against the model as given, on the held-out calibration batches."""
    if manager.reference_outputs is None or manager.holdout is None:
        return None
    compiled = manager.outputs(model)
    masks = [calib_data.token_mask(batch) for batch in manager.holdout.batches]

    def real(runs: list[dict]) -> list[dict]:
        return [{name: calib_data.real_tokens(array, mask) for name, array in run.items()} for run, mask in zip(runs, masks)]

    # Compared at real tokens: padding positions compute values nothing downstream reads.
    outputs = compare_outputs(real(manager.reference_outputs), real(compiled))
    embedding = embedding_metrics(list(outputs), manager.reference_outputs, compiled, manager.holdout.batches)
    return {"holdout_batches": len(manager.holdout), "outputs": outputs, "embedding": embedding}


def _layers(model: ir.Model, kernels: dict, backend: str) -> dict[str, dict]:
    """Per quantized layer: its scheme and what runs it."""
    layers = {}
    for layer, annotation in quantization_annotations(model, full=True).items():
        info = {"preset": annotation["preset"], "scheme": annotation["scheme"],
                "weight_sqnr_db": annotation["weight_sqnr_db"]}
        if backend in ("ort", "tvm") and layer in kernels.get("kernels", {}):
            info["kernel"] = kernels["kernels"][layer]
        elif backend in ("ort", "tvm"):
            info["simulated"] = kernels.get("simulated", {}).get(layer, "no kernel")
        else:
            info["simulated"] = "simulate form (QuantizeLinear/DequantizeLinear and float ops)"
        layers[layer] = info
    return layers


def _check_output_dir(target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise QCompilerError(f"Output '{target}' exists and is not a directory; qcompiler will not overwrite it.")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise QCompilerError(f"Output directory '{target}' is not empty; choose another or pass --force to replace it.")


def save_model(model: ir.Model, path: Path) -> None:
    """Save with external data once the weights approach protobuf's 2 GB limit."""
    if initializer_bytes(model) >= INLINE_LIMIT_BYTES:
        ir.save(model, path, external_data=path.name + ".data")
    else:
        ir.save(model, path)


def write_output(model: ir.Model, report: Report, target: Path, force: bool, details: dict | None = None,
                 trace: ChannelTrace | None = None, library: Any = None) -> None:
    """Write ``model.onnx``, ``report.json`` (and with ``details`` the manifest, report.md and figures) atomically.

    ``library`` is a TVM executable, exported as ``model.so`` beside the model.
    """
    _check_output_dir(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_model(model, staging / "model.onnx")
        if library is not None:
            library.export_library(str(staging / "model.so"))
        report.write_json(staging / "report.json")
        if details is not None:
            table = Console(width=140, file=io.StringIO(), color_system=None)
            report.print(table)
            sqnr = {layer: info["weight_sqnr_db"] for layer, info in details["layers"].items()
                    if math.isfinite(info["weight_sqnr_db"])}
            figures = write_figures(staging, trace, sqnr)
            (staging / "report.md").write_text(artifact.report_markdown(details, table.file.getvalue(), figures),
                                               encoding="utf-8")
            artifact.record_files(staging, details)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
