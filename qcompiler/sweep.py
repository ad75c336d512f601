"""A sweep: models x pipelines x backends, one artifact and one row per cell, resumable, on Ray.

    qcompile sweep sweep.yaml -o out/sweep             # cells as Ray tasks on a local instance
    qcompile sweep sweep.yaml -o out/sweep --ray-address head:6379

The spec (YAML; paths relative to the spec file)::

    models:                          # a built-in name, an ONNX file, a Hugging Face folder, or a mapping
      - minilm
      - {name: llama, path: tiny-llama/, calib: prompts.npz}
    pipelines: [w8a8, "smooth,rotate,w4a8"]
    backends: [ort, {name: tvm, shape: 1x128}]       # default: [ort]
    calib: texts.txt                 # for models without their own (default: a model's built-in data)
    latency: {shape: 8x128, runs: 20}                # or false

Everything the spec names is checked before any cell starts (unknown keys, models, passes,
backend options, calibration files): one sentence. Each cell is one `run_cell` (a picklable
`Cell` in, a `CellResult` out), which `qcompiler.distributed.ray_trials` runs as a Ray task
and ``--no-ray`` runs here; a cell the compiler refuses, or one that hits a qcompiler bug,
records its sentence in its row and the others go on. A cell's artifact carries a
fingerprint of everything that determines it (the source's and calibration file's bytes,
the resolved pipeline, backend and options, qcompiler's version) in its manifest, so a
rerun reuses cells whose artifact is complete and whose fingerprint matches, and compiles
the rest. Latency is timed after the compiles, in this process, each model's cells
interleaved with its FP32 source (timing while other cells compile would measure the
neighbours). The combined table, plot and record are ``sweep.md``, ``sweep.png`` and
``sweep.json`` at the top of the output folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx_ir as ir

from qcompiler import artifact, compiler
from qcompiler.backend import make_backend, parse_shapes
from qcompiler.capture import BUILTIN_MODELS, load
from qcompiler.distributed import MapTrials, serial_trials
from qcompiler.errors import QCompilerError, first_line
from qcompiler.pipeline import format_pipeline, parse_pipeline
from qcompiler.progress import logger
from qcompiler.search_target import METRICS

RECORD = "sweep.json"
SPEC_KEYS = {"models", "pipelines", "backends", "calib", "tokenizer", "batch_size", "max_length", "latency"}
MODEL_KEYS = {"name", "path", "calib", "tokenizer"}
LATENCY_KEYS = {"shape", "runs"}
DEFAULT_LATENCY = {"shape": (8, 128), "runs": 20}


# --- the spec -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One compile of the sweep, all picklable: what `compiler.compile` takes, where it goes, its fingerprint."""

    model: str
    label: str
    pipeline: str  # as the spec writes it (what the tables show); the fingerprint holds it resolved
    backend: str
    backend_options: dict
    calib: str | None
    tokenizer: str | None
    batch_size: int
    max_length: int
    folder: str
    fingerprint: str

    @property
    def backend_label(self) -> str:
        return Path(self.folder).parent.name


@dataclass
class CellResult:
    cell: Cell
    status: str  # compiled | reused | refused | failed (a qcompiler bug)
    error: str | None = None
    metric: str | None = None  # the held-out metric that fits the model: cos, top1 or out-cos
    value: float | None = None
    out_cos: float | None = None
    source_bytes: int | None = None
    weight_bytes: int | None = None
    compile_seconds: float = 0.0
    median_ms: float | None = None
    latency_ratio: float | None = None

    @property
    def size_ratio(self) -> float | None:
        """Artifact weight bytes over the source's (None for a source without constant tensors)."""
        return self.weight_bytes / self.source_bytes if self.source_bytes else None


@dataclass
class Sweep:
    cells: list[Cell]
    latency: dict | None  # {"shape": (batch, sequence), "runs": n}, or None: not timed
    spec: dict


def load_spec(path: str | Path) -> dict:
    """The spec file's mapping; a missing, unreadable or non-YAML file is one sentence."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise QCompilerError(f"Sweep spec '{path}' does not exist.")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise QCompilerError(f"Sweep spec '{path}' is not valid YAML ({first_line(exc)}).") from None
    if not isinstance(spec, dict):
        raise QCompilerError(f"Sweep spec '{path}' must be a mapping with 'models' and 'pipelines'.")
    return spec


def plan(spec: dict, output: str | Path, base: str | Path = ".") -> Sweep:
    """Check the whole spec and lay out its cells under ``output``; relative paths are taken from ``base``."""
    base, output = Path(base), Path(output)
    _known_keys(spec, SPEC_KEYS, "the sweep spec")
    for key in ("models", "pipelines"):
        if not isinstance(spec.get(key), list) or not spec[key]:
            raise QCompilerError(f"The sweep spec needs '{key}': a non-empty list.")
    batch_size = _positive(spec.get("batch_size", 8), "batch_size")
    max_length = _positive(spec.get("max_length", 128), "max_length")
    pipelines = [_pipeline(p) for p in spec["pipelines"]]
    backends = _backends(spec.get("backends", ["ort"]))
    models = _models(spec["models"], base, spec.get("calib"), spec.get("tokenizer"))
    version = code_digest()
    cells = []
    for model in models:
        for pipeline, resolved, slug in pipelines:
            for backend, options, label in backends:
                key = {"source": model["digest"], "pipeline": resolved, "backend": backend,
                       "options": _jsonable(options), "calib": model["calib_digest"], "tokenizer": model["tokenizer"],
                       "batch_size": batch_size, "max_length": max_length, "qcompiler": version}
                fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
                cells.append(Cell(model["path"], model["label"], pipeline, backend, options, model["calib"],
                                  model["tokenizer"], batch_size, max_length,
                                  str(output / model["label"] / label / slug), fingerprint))
    return Sweep(cells, _latency(spec.get("latency", True)), spec)


def code_digest() -> str:
    """SHA-256 of qcompiler's own source (core, passes, backends) and the versions of what it runs on.

    The version string alone would let a rerun after a code change reuse artifacts the new
    code would compile differently.
    """
    import qcompiler
    from qcompiler import backends, passes

    digest = hashlib.sha256(json.dumps(artifact.versions(), sort_keys=True).encode())
    for package in (qcompiler, passes, backends):
        root = Path(package.__file__).parent
        for file in sorted(root.rglob("*.py")):
            digest.update(str(file.relative_to(root)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _known_keys(mapping: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(map(str, mapping)) - known)
    if unknown:
        raise QCompilerError(f"Unknown key '{unknown[0]}' in {where}; its keys are: {', '.join(sorted(known))}.")


def _positive(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise QCompilerError(f"'{key}' in the sweep spec must be a positive integer, not {value!r}.")
    return value


def _pipeline(text: Any) -> tuple[str, str, str]:
    """The pipeline as written, resolved (every option written out: fingerprints ignore spelling), its folder name."""
    if not isinstance(text, str):
        raise QCompilerError(f"A pipeline in the sweep spec must be a string such as 'smooth,w8a8', not {text!r}.")
    resolved = format_pipeline(parse_pipeline(text))  # unknown passes and options raise here, before any cell
    slug = re.sub(r"[^A-Za-z0-9=.]+", "-", text.replace(" ", "")).strip("-") or "normalize"
    return text, resolved, slug


def _backends(entries: Any) -> list[tuple[str, dict, str]]:
    if not isinstance(entries, list) or not entries:
        raise QCompilerError("'backends' in the sweep spec must be a non-empty list (e.g. [ort, tvm]).")
    found, labels = [], set()
    for entry in entries:
        options = dict(entry) if isinstance(entry, dict) else {"name": entry}
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise QCompilerError(f"A backend in the sweep spec needs a name (e.g. ort, or {{name: tvm, shape: 1x128}}), "
                                 f"not {entry!r}.")
        if isinstance(options.get("shape"), str):
            options["shape"] = parse_shapes(options["shape"])
        make_backend(name, **options)  # unknown backends and options raise here
        label = name if not options else name + "-" + "-".join(re.sub(r"[^A-Za-z0-9]+", "x", str(v)).strip("x")
                                                            for _, v in sorted(options.items()))
        if label in labels:
            raise QCompilerError(f"The sweep spec lists backend '{label}' twice.")
        labels.add(label)
        found.append((name, options, label))
    return found


def _models(entries: list, base: Path, calib: Any, tokenizer: Any) -> list[dict]:
    models, labels = [], set()
    for entry in entries:
        entry = dict(entry) if isinstance(entry, dict) else {"path": entry}
        _known_keys(entry, MODEL_KEYS, f"model {entry.get('name') or entry.get('path')!r}")
        if not isinstance(entry.get("path"), str):
            raise QCompilerError(f"A model in the sweep spec needs a path (or a built-in name), not {entry!r}.")
        path = _model_path(entry["path"], base)
        label = str(entry.get("name") or Path(entry["path"].rstrip("/")).stem)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", label) or label in labels:
            raise QCompilerError(f"Model name '{label}' in the sweep spec must be unique and a plain folder name "
                                 "(letters, digits, '_', '.', '-'); give it a 'name'.")
        labels.add(label)
        data = entry.get("calib", calib)
        data_path = None if data is None else _existing(data, base, "calibration file")
        words = entry.get("tokenizer", tokenizer)
        tokenizer_path = None if words is None else (words if words in BUILTIN_MODELS
                                                    else _existing(words, base, "tokenizer"))
        models.append({"label": label, "path": path, "digest": artifact.source_digest(path).get("sha256", path),
                       "calib": data_path, "tokenizer": tokenizer_path,
                       "calib_digest": None if data_path is None else artifact.source_digest(data_path)["sha256"]})
    return models


def _model_path(text: str, base: Path) -> str:
    if text in BUILTIN_MODELS:
        return text
    path = base / text
    if not path.exists():
        raise QCompilerError(f"Model '{text}' in the sweep spec does not exist (looked for {path}; built-in names: "
                             f"{', '.join(BUILTIN_MODELS)}).")
    if path.is_dir() and not (path / "config.json").is_file():
        raise QCompilerError(f"Model folder '{text}' in the sweep spec is not a Hugging Face folder (no config.json).")
    return str(path)


def _existing(text: Any, base: Path, what: str) -> str:
    path = base / str(text)
    if not path.exists():
        raise QCompilerError(f"The {what} '{text}' in the sweep spec does not exist (looked for {path}).")
    return str(path)


def _latency(entry: Any) -> dict | None:
    if entry is False:
        return None
    if entry is True or entry is None:
        return dict(DEFAULT_LATENCY)
    if not isinstance(entry, dict):
        raise QCompilerError(f"'latency' in the sweep spec is true, false or {{shape: 8x128, runs: 20}}, not {entry!r}.")
    _known_keys(entry, LATENCY_KEYS, "'latency'")
    shape = entry.get("shape", DEFAULT_LATENCY["shape"])
    shapes = parse_shapes(shape) if isinstance(shape, str) else [tuple(shape)]
    if len(shapes) != 1:
        raise QCompilerError("'latency: shape' in the sweep spec is one BATCHxSEQUENCE (e.g. 8x128).")
    runs = entry.get("runs", DEFAULT_LATENCY["runs"])
    if not isinstance(runs, int) or runs < 3:
        raise QCompilerError(f"'latency: runs' in the sweep spec must be an integer of at least 3, not {runs!r}.")
    return {"shape": shapes[0], "runs": runs}


def _jsonable(options: dict) -> dict:
    return json.loads(json.dumps(options, default=list))


# --- one cell -----------------------------------------------------------------------------------------------------

def run_cell(cell: Cell) -> CellResult:
    """Compile one cell into its folder, atomically, with its fingerprint in the manifest; failures become its row."""
    folder = Path(cell.folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    tick = time.perf_counter()
    try:
        staged = staging / folder.name
        result = compiler.compile(cell.model, cell.pipeline, calib=cell.calib, tokenizer=cell.tokenizer,
                                  backend=cell.backend, output=staged, batch_size=cell.batch_size,
                                  max_length=cell.max_length, log=lambda _: None, **cell.backend_options)
        seconds = time.perf_counter() - tick
        manifest = result.manifest
        manifest["sweep"] = {"fingerprint": cell.fingerprint, "compile_seconds": seconds}
        artifact.record_files(staged, manifest)
        artifact.replace_dir(staged, folder)
        return _result(cell, manifest, "compiled")
    except QCompilerError as exc:
        shutil.rmtree(folder, ignore_errors=True)  # a stale artifact of an older spec must not sit beside this row
        return CellResult(cell, "refused", str(exc), compile_seconds=time.perf_counter() - tick)
    except Exception as exc:  # a qcompiler bug in one cell: recorded, and the sweep goes on
        shutil.rmtree(folder, ignore_errors=True)
        return CellResult(cell, "failed", f"qcompiler bug: {type(exc).__name__}: {first_line(exc)}",
                          compile_seconds=time.perf_counter() - tick)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def reusable(cell: Cell) -> CellResult | None:
    """The cell's row from its artifact on disk when that is complete and was compiled from the same fingerprint."""
    try:
        _, manifest = artifact.open_artifact(cell.folder)
    except QCompilerError:
        return None
    if manifest.get("sweep", {}).get("fingerprint") != cell.fingerprint:
        return None
    return _result(cell, manifest, "reused")


def _result(cell: Cell, manifest: dict, status: str) -> CellResult:
    fidelity = manifest.get("fidelity")
    metric = "cos" if fidelity and fidelity.get("embedding") else "top1" if fidelity and fidelity.get("next_token") \
        else "out-cos"
    sizes = manifest["weight_bytes"]
    return CellResult(cell, status, metric=metric, value=METRICS[metric].read(fidelity),
                      out_cos=METRICS["out-cos"].read(fidelity), source_bytes=sizes["source"],
                      weight_bytes=sizes["artifact"], compile_seconds=manifest["sweep"]["compile_seconds"])


# --- the sweep ----------------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    output: Path
    rows: list[CellResult]
    latency: dict | None
    seconds: float = 0.0
    figures: list[str] = field(default_factory=list)

    @property
    def bugs(self) -> list[CellResult]:
        return [row for row in self.rows if row.status == "failed"]

    def columns(self) -> list[str]:
        return ["model", "backend", "pipeline", "metric", "value", "out-cos", "size / fp32", "latency / fp32", "ms",
                "compile s", "cell"]

    def cells(self) -> list[list[str]]:
        table = []
        for row in self.rows:
            if row.error:
                table.append([row.cell.label, row.cell.backend_label, row.cell.pipeline or "normalize", "", "", "", "",
                              "", "", f"{row.compile_seconds:.0f}", f"{row.status}: {row.error}"])
                continue
            table.append([row.cell.label, row.cell.backend_label, row.cell.pipeline or "normalize", row.metric,
                          _fmt(row.value, ".5f"), _fmt(row.out_cos, ".5f"),
                          _fmt(row.size_ratio, ".3f"), _fmt(row.latency_ratio, ".2f"),
                          _fmt(row.median_ms, ".1f"), f"{row.compile_seconds:.0f}", row.status])
        return table

    def markdown(self) -> str:
        timed = f"latency at {self.latency['shape'][0]}x{self.latency['shape'][1]}, each model's cells interleaved " \
                "with its FP32 source in one process" if self.latency else "latency not timed"
        lines = [f"# Sweep: {len(self.rows)} cells", "", f"Fidelity on each cell's held-out calibration split; {timed}; "
                 f"{self.seconds:.0f} s in all.", "", "| " + " | ".join(self.columns()) + " |",
                 "|---|---|---|---|" + "---:|" * 6 + "---|"]
        lines += ["| " + " | ".join(f"`{c}`" if i == 2 else c for i, c in enumerate(row)) + " |" for row in self.cells()]
        lines += [""] + [f"![{f}]({f})\n" for f in self.figures]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        def row(result: CellResult) -> dict:
            data = {k: v for k, v in dataclasses.asdict(result).items() if k != "cell"}
            cell = result.cell
            return {"model": cell.label, "source": cell.model, "pipeline": cell.pipeline, "backend": cell.backend,
                    "backend_options": _jsonable(cell.backend_options), "folder": cell.folder,
                    "fingerprint": cell.fingerprint, **data}

        return {"seconds": self.seconds, "latency": self.latency, "rows": [row(r) for r in self.rows]}


def sweep(spec: dict | str | Path, output: str | Path, *, map_trials: MapTrials = serial_trials, force: bool = False,
          log: Callable[[str], None] = logger.info) -> SweepResult:
    """Compile every cell of ``spec`` (a mapping, or a YAML file) under ``output``, reusing cells already there.

    ``map_trials(run_cell, cells)`` runs the cells that need compiling (default: here, one
    after another; `qcompiler.distributed.ray_trials` gives Ray's). ``force`` recompiles
    every cell and lets the sweep write into a non-empty folder that is not a sweep's.
    """
    started = time.perf_counter()
    base = Path(spec).parent if isinstance(spec, (str, Path)) else Path(".")
    mapping = load_spec(spec) if isinstance(spec, (str, Path)) else spec
    output = Path(output)
    layout = plan(mapping, output, base)
    _check_output(output, force)
    output.mkdir(parents=True, exist_ok=True)
    _write_json(output / RECORD, {"status": "running", "spec": mapping})
    done = {} if force else {cell.folder: reusable(cell) for cell in layout.cells}
    pending = [cell for cell in layout.cells if done.get(cell.folder) is None]
    log(f"sweep: {len(layout.cells)} cells, {len(layout.cells) - len(pending)} reused, {len(pending)} to compile")
    for result in map_trials(run_cell, pending):
        done[result.cell.folder] = result
        shown = result.error or f"{result.metric} {_fmt(result.value, '.5f')}"
        log(f"sweep: {result.cell.label} / {result.cell.backend_label} / {result.cell.pipeline}: {shown}")
    rows = [done[cell.folder] for cell in layout.cells]
    if layout.latency:
        _time_cells(rows, layout.latency)
    result = SweepResult(output, rows, layout.latency)
    result.seconds = time.perf_counter() - started
    result.figures = ["sweep.png"] if _plot(result, output / "sweep.png") else []
    (output / "sweep.md").write_text(result.markdown(), encoding="utf-8")
    _write_json(output / RECORD, {"status": "done", "spec": mapping, **result.to_json()})
    return result


def _check_output(output: Path, force: bool) -> None:
    """A sweep writes into its own folder again and again (that is how it resumes), never into a stranger's."""
    if output.exists() and not output.is_dir():
        raise QCompilerError(f"Output '{output}' exists and is not a directory; qcompiler will not overwrite it.")
    if output.is_dir() and any(output.iterdir()) and not (output / RECORD).is_file() and not force:
        raise QCompilerError(f"Output directory '{output}' is not empty and holds no sweep ({RECORD}); choose another "
                             "or pass --force to write the sweep's folders into it.")


def _time_cells(rows: list[CellResult], latency: dict) -> None:
    """Per model and timed shape: its compiled cells interleaved with the FP32 source, one process."""
    from qcompiler.benchmarking import compare_latency, synthetic_feeds

    groups: dict[tuple[str, tuple[int, int]], list[tuple[CellResult, Any]]] = {}
    for row in rows:
        if row.error:
            continue
        path, manifest = artifact.open_artifact(row.cell.folder)
        backend = make_backend(row.cell.backend, **row.cell.backend_options)
        shape = backend.bench_shape(manifest) or latency["shape"]
        session = backend.session(Path(row.cell.folder), manifest, ir.load(path), timed=True)
        groups.setdefault((row.cell.model, tuple(shape)), []).append((row, session))
    for (model, shape), members in groups.items():
        fp32 = load(model)
        sessions = {"fp32": fp32, **{str(index): session for index, (_, session) in enumerate(members)}}
        timed = compare_latency(sessions, synthetic_feeds(fp32, *shape), latency["runs"])
        for index, (row, _) in enumerate(members):
            row.median_ms, row.latency_ratio = timed[str(index)]["median_ms"], timed[str(index)]["ratio"]


def _plot(result: SweepResult, path: Path) -> bool:
    """Per model: fidelity against latency (or size, when untimed), a marker per backend, each point labelled."""
    rows = [r for r in result.rows if r.value is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    models = list(dict.fromkeys(r.cell.label for r in rows))
    figure, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False, layout="constrained")
    markers = dict(zip(dict.fromkeys(r.cell.backend_label for r in rows), "os^Dv<>p"))
    for axis, model in zip(axes[0], models):
        mine = [r for r in rows if r.cell.label == model]
        timed = all(r.latency_ratio is not None for r in mine)
        mine = [r for r in mine if _x(r, timed) is not None]
        for backend, marker in markers.items():
            points = [r for r in mine if r.cell.backend_label == backend]
            if points:
                axis.scatter([_x(r, timed) for r in points], [r.value for r in points], marker=marker, label=backend)
            for r in points:
                axis.annotate(r.cell.pipeline or "normalize", (_x(r, timed), r.value), fontsize=7, xytext=(3, 3),
                              textcoords="offset points")
        axis.set_title(model)
        axis.set_xlabel("latency / FP32" if timed else "weight bytes / FP32")
        axis.set_ylabel(f"held-out {mine[0].metric}")
        axis.legend(fontsize=7)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _x(row: CellResult, timed: bool) -> float:
    return row.latency_ratio if timed else row.size_ratio


def _write_json(path: Path, data: dict) -> None:
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(json.dumps(data, indent=2, default=_plain) + "\n", encoding="utf-8")
    staged.replace(path)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, set)) else float(value)


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
