"""The ``qcompile`` command.

    qcompile MODEL [--passes P] [--calib FILE] -o DIR     compile (the default command)
    qcompile passes                                        list passes and presets
    qcompile inspect MODEL [--calib FILE]                  ops, linears, outliers
    qcompile eval REF COMPILED --data FILE                 fidelity of COMPILED against REF
    qcompile run DIR --inputs FILE.npz [-o OUT.npz]        run an artifact
    qcompile bench DIR [--reference MODEL]                 latency against the FP32 source, interleaved
    qcompile generate DIR --prompt TEXT                    decode from a causal LM artifact with its KV cache

User errors print one sentence and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console

from qcompiler.backend import backend_names, make_backend, option_choices, parse_shapes
from qcompiler.calibration.engine import parse_memory
from qcompiler.errors import QCompilerBug, QCompilerError
from qcompiler.pass_manager import DEFAULT_TOLERANCE

console = Console(stderr=True)
# Reports are tables; when piped (CI logs, files) do not squeeze them to 80 columns.
stdout = Console() if sys.stdout.isatty() else Console(width=140)
COMMANDS = ("compile", "passes", "inspect", "eval", "run", "bench", "generate", "sweep")


class DefaultToCompile(click.Group):
    """``qcompile MODEL ...`` means ``qcompile compile MODEL ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in COMMANDS and args[0] not in ("--help", "-h", "--version"):
            args = ["compile", *args]
        return super().parse_args(ctx, args)


def _guard(debug: bool, action: Callable[[], Any]) -> Any:
    """Run ``action``; user errors become one sentence and exit status 2."""
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return action()
    except QCompilerError as exc:
        if debug:
            traceback.print_exc()
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except QCompilerBug as exc:
        if debug:
            traceback.print_exc()
        console.print(f"[bold red]internal error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as exc:  # a bug in qcompiler, not the user's input
        if debug:
            traceback.print_exc()
        console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                      highlight=False, soft_wrap=True)
        sys.exit(1)


@click.group(cls=DefaultToCompile, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qcompiler")
def main() -> None:
    """qcompiler: capture a model, run quantization passes, write a deployable model."""


def _calibration_options(func):
    func = click.option("--calib", type=click.Path(dir_okay=False), help="Calibration data: .npz of named arrays, or a text file (one sample per line).")(func)
    func = click.option("--tokenizer", help="Tokenizer for text calibration: a Hugging Face tokenizer folder or 'minilm'.")(func)
    func = click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)(func)
    func = click.option("--max-length", type=click.IntRange(min=1), default=128, show_default=True, help="Token limit per text sample.")(func)
    func = click.option("--debug", is_flag=True, help="Show tracebacks.")(func)
    return func


def _parse_shape(ctx: click.Context, param: click.Parameter, text: str | None) -> list[tuple[int, int]] | str | None:
    if text is None:
        return None
    try:
        return parse_shapes(text)
    except QCompilerError as exc:
        raise click.BadParameter(str(exc), param_hint="--shape") from None


def _ray_options(func):
    func = click.option("--no-ray", is_flag=True, help="Run the trials one after another in this process instead of "
                        "as Ray tasks.")(func)
    func = click.option("--ray-address", help="Run the trials on this Ray cluster (host:port of its head, "
                        "ray://host:port, or auto; default: a local Ray instance on this machine).")(func)
    return func


def _trial_runner(ray_address: str | None, no_ray: bool):
    """The ``map_trials`` context the search and the sweep run their trials under."""
    import contextlib

    from qcompiler.distributed import ray_trials, serial_trials

    if no_ray and ray_address:
        raise QCompilerError("--no-ray runs the trials here; it takes no --ray-address.")
    return contextlib.nullcontext(serial_trials) if no_ray else ray_trials(ray_address)


@main.command("compile")
@click.argument("model")
@click.option("--passes", "passes", default="", help="Pipeline, e.g. 'normalize' or 'convert-opset(version=21),simplify' (see 'qcompile passes').")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output directory (model.onnx, report.json).")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--tolerance", type=float, default=DEFAULT_TOLERANCE, show_default=True, help="Max relative output error allowed per function-preserving pass.")
@click.option("--no-verify", is_flag=True, help="Skip output verification after passes.")
@click.option("--no-normalize", is_flag=True, help="Do not prepend the normalize preset.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--backend", type=click.Choice(backend_names()), default="ort", show_default=True,
              help="Where the artifact runs: ort (onnxruntime's integer kernels), tvm (a compiled library), or "
                   "simulate (the float Q/DQ model, for fidelity studies; slower than the source).")
@click.option("--format", "artifact_format", type=click.Choice(["onnx", "compressed-tensors"]), default="onnx",
              show_default=True, help="compressed-tensors: also write a Hugging Face checkpoint (config.json, "
              "safetensors) that vLLM and transformers load; for models captured from a Hugging Face folder.")
@click.option("--target", help="With --backend tvm: the TVM target (default llvm: this CPU).")
@click.option("--shape", callback=_parse_shape, help="With --backend tvm: 'any' (the default), one library for every "
              "batch, sequence and past length; or BATCHxSEQUENCE, a static shape the library is built for; several, "
              "comma-separated (1x32,1x128), give one library with an entry per shape. With --search on another "
              "backend: the shape candidates are timed at (default 8x128).")
@click.option("--dialect", type=click.Choice(option_choices("ort", "dialect")),
              help="With --backend ort: ort (contrib kernels such as MatMulNBits, the default) or qdq (standard ONNX "
                   "Q/DQ, opset 21).")
@click.option("--int8", "int8", type=click.Choice(option_choices("ort", "int8")),
              help="With --backend ort: the int8 GEMM layout (default auto: u8s8 where this CPU has VNNI, else u8u8, "
                   "which does not saturate).")
@click.option("--search", "search_target", help="Choose the pipeline: the fastest candidate on --backend whose held-out "
              "fidelity meets this target, e.g. 'cos>=0.998' (sentence embeddings) or 'top1>=0.95', 'kl<=0.05', "
              "'ppl<=1.05' (causal LMs). Replaces --passes.")
@click.option("--budget", help="With --search: time for the compiles, e.g. 900, 90s, 20m, 1h (default: no limit).")
@click.option("--best-effort", is_flag=True, help="With --search: when no candidate meets the target, write the "
              "closest one instead of refusing.")
@click.option("--max-memory", help="What calibration holds at once (exposed activations, GPTQ's X^T X), e.g. 512M or "
              "8G (default 2G): a smaller bound takes more runs over the data.")
@_ray_options
@_calibration_options
def compile_command(model, passes, output, force, tolerance, no_verify, no_normalize, quiet, backend, artifact_format,
                    target, shape, dialect, int8, search_target, budget, best_effort, max_memory, ray_address, no_ray,
                    calib, tokenizer, batch_size, max_length, debug) -> None:
    """Compile MODEL (ONNX file, Hugging Face folder, or 'minilm') through a pass pipeline."""
    from qcompiler.compiler import compile as run_compile

    def action():
        from qcompiler.progress import configure_console

        configure_console(quiet)
        if search_target is not None:
            _search(model, search_target, passes, output, force, no_normalize, artifact_format, backend,
                    {"dialect": dialect, "int8": int8, "target": target, "shape": shape}, budget, best_effort, calib,
                    tokenizer, batch_size, max_length, quiet, _trial_runner(ray_address, no_ray))
            return
        if search_target is None and max_memory is not None:
            parse_memory(max_memory)  # a bad size is refused before anything is loaded
        if budget is not None or best_effort or ray_address or no_ray:
            raise QCompilerError("--budget, --best-effort, --ray-address and --no-ray belong to --search, which was "
                                 "not given.")
        chosen_backend = backend
        if artifact_format == "compressed-tensors":
            source = click.get_current_context().get_parameter_source("backend")
            if source == click.core.ParameterSource.COMMANDLINE and backend != "compressed-tensors":
                raise QCompilerError(f"--format compressed-tensors writes a checkpoint beside its simulate model; it "
                                     f"takes no --backend {backend}.")
            chosen_backend = "compressed-tensors"
        given = {"dialect": dialect, "int8": int8, "target": target, "shape": shape}
        chosen = make_backend(chosen_backend, **{name: value for name, value in given.items() if value is not None})
        result = run_compile(model, passes, calib=calib, tokenizer=tokenizer, output=output, force=force,
                             normalize=not no_normalize, tolerance=tolerance, verify=not no_verify,
                             batch_size=batch_size, max_length=max_length, max_memory=max_memory, progress=not quiet,
                             backend=chosen)
        if not quiet:
            result.report.print(stdout)
            for line in result.manifest.get("summary", []) if result.manifest else []:
                stdout.print(line, highlight=False, soft_wrap=True)
            fidelity = result.manifest.get("fidelity") if result.manifest else None
            if fidelity and fidelity.get("embedding"):
                e = fidelity["embedding"]
                stdout.print(f"held-out sentence embeddings vs the source: mean cosine {e['mean_cosine']:.5f}, "
                             f"min {e['min_cosine']:.5f}")
            if fidelity and fidelity.get("next_token"):
                from qcompiler.next_token import next_token_line

                stdout.print(f"held-out next tokens vs the source: {next_token_line(fidelity['next_token'])}")
            written = sorted(result.manifest.get("files", {})) if result.manifest else []
            files = ", ".join(["model.onnx", *(f for f in written if f != "model.onnx"), "manifest.json"])
            stdout.print(f"wrote {result.output}/ ({files})")

    _guard(debug, action)


def _search(model, target, passes, output, force, no_normalize, artifact_format, backend, given, budget, best_effort,
            calib, tokenizer, batch_size, max_length, quiet, runner) -> None:
    """``--search``: run the recipe search, print its frontier, write the winner."""
    from qcompiler.recipe_search import TargetNotMet, search

    if passes:
        raise QCompilerError("--search chooses the passes itself; give --passes or --search, not both.")
    if no_normalize or artifact_format != "onnx":
        raise QCompilerError("--search starts from the normalized model and writes an ONNX artifact; it takes no "
                             f"{'--no-normalize' if no_normalize else '--format ' + artifact_format}.")
    options = {name: value for name, value in given.items() if value is not None}
    timed = {}
    if backend != "tvm" and "shape" in options:  # a library's shape for TVM; elsewhere the shape to time at
        shapes = options.pop("shape")
        if shapes == "any" or len(shapes) != 1:
            raise QCompilerError(f"--search with --backend {backend} times one shape; give --shape BATCHxSEQUENCE once.")
        timed["shape"] = shapes[0]
    try:
        with runner as map_trials:
            result = search(model, target, calib=calib, tokenizer=tokenizer, backend=backend, budget=budget,
                            output=output, force=force, best_effort=best_effort, batch_size=batch_size,
                            max_length=max_length, map_trials=map_trials,
                            log=(lambda _: None) if quiet else console.print, **timed, **options)
    except TargetNotMet as refused:
        _print_frontier(refused.result)
        raise
    if not quiet:
        _print_frontier(result)
        chosen = result.winner
        met = "meets" if result.target.met(chosen.value) else "is the closest to (best effort)"
        stdout.print(f"chose {chosen.pipeline}: {result.target.metric.name} {chosen.value:.5f} {met} {result.target}, "
                     f"{chosen.latency_ratio:.2f}x FP32 latency on {result.backend}; wrote {result.output}/ "
                     "(search.json, search.png, report.md)", highlight=False, soft_wrap=True)
        if result.warning():
            stdout.print(f"warning: {result.warning()}", highlight=False, soft_wrap=True)


def _print_frontier(result) -> None:
    from rich.table import Table

    table = Table(title=f"recipe search: {result.target} on {result.backend}, latency at "
                        f"{result.shape[0]}x{result.shape[1]} ({len(result.trials)} trials, {result.seconds:.0f} s)")
    for index, column in enumerate(result.columns()):
        table.add_column(column, justify="left" if index in (0, 6) else "right")
    for row in result.rows():
        table.add_row(*row)
    stdout.print(table)
    if result.unexplored:
        stdout.print(f"left unexplored by the budget: {', '.join(result.unexplored)}", highlight=False, soft_wrap=True)


@main.command("sweep")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder of the sweep: a folder per cell, sweep.md, sweep.json, sweep.png. A rerun into the same "
                   "folder reuses the cells already compiled from the same inputs.")
@click.option("--force", is_flag=True, help="Recompile every cell, and allow a non-empty folder that holds no sweep.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
@_ray_options
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def sweep_command(spec, output, force, quiet, ray_address, no_ray, debug) -> None:
    """Compile every model x pipeline x backend cell of SPEC (YAML) as Ray tasks; one table for all.

    A cell the compiler refuses records its sentence in its row and the others go on; the
    exit status is 1 when a cell hit a qcompiler bug, else 0.
    """

    def action():
        from rich.table import Table

        from qcompiler.progress import configure_console
        from qcompiler.sweep import load_spec, plan, sweep

        configure_console(quiet)
        plan(load_spec(spec), output, Path(spec).parent)  # the whole spec checked before Ray starts
        with _trial_runner(ray_address, no_ray) as map_trials:
            result = sweep(spec, output, map_trials=map_trials, force=force,
                           log=(lambda _: None) if quiet else console.print)
        if not quiet:
            table = Table(title=f"sweep: {len(result.rows)} cells ({result.seconds:.0f} s)")
            for index, column in enumerate(result.columns()):
                table.add_column(column, justify="left" if index in (0, 1, 2, 3, 10) else "right")
            for row in result.cells():
                table.add_row(*row)
            stdout.print(table)
            refused = sum(row.status == "refused" for row in result.rows)
            stdout.print(f"wrote {output}/ (sweep.md, sweep.json{', sweep.png' if result.figures else ''}, a folder "
                         f"per cell); {refused} refused, {len(result.bugs)} qcompiler bugs", highlight=False)
        if result.bugs:
            raise QCompilerBug(f"{len(result.bugs)} cell(s) hit a qcompiler bug (first: {result.bugs[0].error}); "
                               "their rows say which; please report it")

    _guard(debug, action)


@main.command("passes")
@click.argument("name", required=False)
def passes_command(name) -> None:
    """List passes, presets and backends with each option's meaning and default; NAME shows one of them."""

    def action():
        from qcompiler.catalog import catalog

        for item in catalog(name):
            stdout.print(item, highlight=False)

    _guard(False, action)


@main.command("inspect")
@click.argument("model")
@click.option("--no-normalize", is_flag=True, help="Inspect the model as captured, before normalization.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--passes", "pipeline", default="", help="Apply these passes (after normalize) before inspecting.")
@click.option("--verbose", is_flag=True, help="Every region on its own row, and node names beside module paths.")
@_calibration_options
def inspect_command(model, no_normalize, as_json, pipeline, verbose, calib, tokenizer, batch_size, max_length,
                    debug) -> None:
    """Op summary, linears, regions and (with calibration data) the outlier table."""

    def action():
        from qcompiler import inspection
        from qcompiler.analysis.conv_regions import find_conv_regions
        from qcompiler.analysis.regions import find_regions
        from qcompiler.analysis.residual import find_streams
        from qcompiler.calibration.engine import CalibrationEngine
        from qcompiler.capture import load
        from qcompiler.calibration.resolve import resolve_calibration
        from qcompiler.compiler import NORMALIZE
        from qcompiler.pass_manager import PassManager
        from qcompiler.pipeline import parse_pipeline

        ir_model = load(model)
        passes = parse_pipeline(pipeline) if pipeline else []
        if not no_normalize:
            PassManager(parse_pipeline(NORMALIZE), verify=False, progress=False).run(ir_model)
        data = resolve_calibration(calib, ir_model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        if passes:
            PassManager(passes, calibration=data, progress=not as_json).run(ir_model)
        rows = inspection.outlier_rows(ir_model, CalibrationEngine(data, progress=not as_json)) if data else None
        if as_json:
            stdout.print_json(json.dumps(inspection.inspection_dict(ir_model, rows)))
            return
        stdout.print(inspection.op_table(ir_model))
        stdout.print(inspection.linear_table(ir_model, verbose))
        convolutions = inspection.convolution_table(ir_model)
        if convolutions is not None:
            stdout.print(convolutions)
        stdout.print(inspection.region_table(find_regions(ir_model.graph).regions, verbose))
        conv_regions = inspection.conv_region_table(find_conv_regions(ir_model.graph), verbose)
        if conv_regions is not None:
            stdout.print(conv_regions)
        stdout.print(inspection.stream_table(find_streams(ir_model.graph)))
        if rows is None:
            stdout.print("no calibration data: give --calib (and --tokenizer for text) for the outlier table")
        else:
            stdout.print(inspection.outlier_table(rows))
            stdout.print(f"calibration: {data.source}")

    _guard(debug, action)


@main.command("eval")
@click.argument("reference")
@click.argument("compiled")
@click.option("--data", type=click.Path(dir_okay=False),
              help="Evaluation data (not the calibration data): .npz of named arrays, or a text file (one sample per line).")
@click.option("--perplexity", "perplexity_text", type=click.Path(dir_okay=False),
              help="Causal LMs: a text file whose perplexity to measure under both models (strided windows).")
@click.option("--window", type=click.IntRange(min=2), help="With --perplexity: tokens per window (default: "
              "512, or the model's positions if fewer).")
@click.option("--stride", type=click.IntRange(min=1), help="With --perplexity: tokens between window starts "
              "(default: half the window).")
@click.option("--tokenizer", help="Tokenizer for text data: a Hugging Face tokenizer folder or 'minilm'.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-length", type=click.IntRange(min=1), default=128, show_default=True, help="Token limit per text sample.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def eval_command(reference, compiled, data, perplexity_text, window, stride, tokenizer, batch_size, max_length,
                 as_json, debug) -> None:
    """Fidelity of COMPILED (an ONNX file or an output directory) against REFERENCE on --data (and --perplexity)."""

    def action():
        from qcompiler.capture import load
        from qcompiler.calibration.resolve import resolve_calibration
        from qcompiler.evaluation import Evaluation, evaluate

        from qcompiler.compiler import NORMALIZE
        from qcompiler.pass_manager import PassManager
        from qcompiler.pipeline import parse_pipeline

        if data is None and perplexity_text is None:
            raise QCompilerError("Give --data (evaluation inputs) or --perplexity (a text, for causal LMs), or both.")
        if perplexity_text is None and (window or stride):
            raise QCompilerError("--window and --stride apply to --perplexity, which was not given.")
        compiled_file = _model_file(compiled)  # before the reference's capture, which may take a while
        ref_model = load(reference)
        # Normalizing the reference (function-preserving) gives it the linears the compiled model has.
        PassManager(parse_pipeline(NORMALIZE), verify=False, progress=False).run(ref_model)
        candidate = load(compiled_file)
        if data is not None:
            batches = resolve_calibration(data, ref_model, tokenizer=tokenizer, batch_size=batch_size,
                                          max_length=max_length, what="evaluation batch")
            result = evaluate(ref_model, candidate, batches.batches)
        else:
            result = Evaluation({}, None)
        if perplexity_text is not None:
            result.perplexity = _perplexities(ref_model, candidate, perplexity_text, tokenizer, window, stride)
        if as_json:
            stdout.print_json(json.dumps(result.to_dict(), default=float))
            return
        for table in result.tables():
            stdout.print(table)

    _guard(debug, action)


def _perplexities(reference, candidate, text_path: str, tokenizer: str | None, window: int | None,
                  stride: int | None) -> dict:
    """Strided perplexity of the source and of the compiled model on the same tokens of ``text_path``."""
    import numpy as np

    from qcompiler import decoding, next_token
    from qcompiler.capture import TOKENIZER_KEY, load_tokenizer
    from qcompiler.runtime import make_session

    layout = decoding.require_layout(reference, "--perplexity")
    decoding.require_layout(candidate, "--perplexity")
    folder = tokenizer or reference.metadata_props.get(TOKENIZER_KEY)
    if folder is None:
        raise QCompilerError("--perplexity needs a tokenizer and the model records none; name one with --tokenizer.")
    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QCompilerError(f"Text file '{text_path}' does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise QCompilerError(f"'{text_path}' is not a readable UTF-8 text file ({exc}).") from None
    ids = np.asarray(load_tokenizer(folder)(text)["input_ids"], dtype=np.int64)
    positions = decoding.generation_settings(reference).get("max_position_embeddings")
    window = window or min(512, positions or 512)
    decoding.check_prompt_length(reference, window)
    stride = stride or max(1, window // 2)
    ref = next_token.perplexity(make_session(reference), layout, ids, window=window, stride=stride)
    cand = next_token.perplexity(make_session(candidate), layout, ids, window=window, stride=stride)
    return {"text": Path(text_path).name, "tokens": ref.tokens, "window": window, "stride": stride,
            "reference": ref.value, "compiled": cand.value}


def _model_file(path: str) -> str:
    """An output directory stands for the model.onnx inside it."""
    if os.path.isdir(path):
        inner = os.path.join(path, "model.onnx")
        if not os.path.isfile(inner):
            raise QCompilerError(f"Directory '{path}' holds no model.onnx; give a model file or a qcompile output directory.")
        return inner
    return path


@main.command("run")
@click.argument("artifact_dir")
@click.option("--inputs", required=True, type=click.Path(dir_okay=False), help=".npz of named input arrays.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the outputs to this .npz (must not exist).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def run_command(artifact_dir, inputs, output, debug) -> None:
    """Run the model of ARTIFACT_DIR on --inputs and print (or save) its outputs."""

    def action():
        import numpy as np

        from qcompiler.artifact import open_artifact
        from qcompiler.decoding import PAST_PATTERN
        from qcompiler.runtime import run_batches

        path, manifest = open_artifact(artifact_dir)
        if output and os.path.exists(output):
            raise QCompilerError(f"'{output}' exists; qcompiler will not overwrite it.")
        model = _load_onnx(path)
        feeds = _npz_feeds(inputs, model, "qcompile run")
        given = ", ".join(f"{name} {list(value.shape)} {value.dtype}" for name, value in feeds.items()
                          if not PAST_PATTERN.match(name))
        results = run_batches(_session(artifact_dir, manifest, model), [feeds])[0]
        stdout.print(f"ran the {manifest.get('backend')} artifact '{artifact_dir}' ({manifest.get('pipeline', '')}) "
                     f"on {given}", highlight=False, soft_wrap=True)
        if output:
            np.savez(output, **results)
            stdout.print(f"wrote {output}")
        for name, value in results.items():
            stats = (f", mean {float(value.mean()):.6g}, min {float(value.min()):.6g}, max {float(value.max()):.6g}"
                     if value.size and np.issubdtype(value.dtype, np.number) else "")
            stdout.print(f"{name}: shape {list(value.shape)}, dtype {value.dtype}{stats}", highlight=False)

    _guard(debug, action)


@main.command("bench")
@click.argument("artifact_dir")
@click.option("--reference", help="The FP32 model to compare with (default: the source recorded in the manifest).")
@click.option("--batch", type=click.IntRange(min=1), help="Rows per run (default 8; 1 with --decode).")
@click.option("--sequence", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--inputs", type=click.Path(dir_okay=False),
              help="Time on these inputs (.npz of named arrays, every sample in one run) instead of synthetic ones.")
@click.option("--runs", type=click.IntRange(min=3), help="Timed runs per model (default 20; 5 with --decode).")
@click.option("--decode", is_flag=True, help="Causal LMs: time the prompt and the decode steps with the KV cache.")
@click.option("--prompt-length", type=click.IntRange(min=1), default=128, show_default=True,
              help="With --decode: prompt tokens.")
@click.option("--new-tokens", type=click.IntRange(min=2), default=64, show_default=True,
              help="With --decode: tokens generated per run.")
@click.option("--threads", type=click.IntRange(min=0), default=0,
              help="Threads for onnxruntime and TVM (0: their defaults).")
@click.option("--against", multiple=True, type=click.Path(file_okay=False),
              help="Another artifact (e.g. the ORT one of the same pipeline) to time in the same runs; repeatable.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def bench_command(artifact_dir, reference, batch, sequence, inputs, runs, decode, prompt_length, new_tokens, threads, against,
                  debug) -> None:
    """Latency of ARTIFACT_DIR against its FP32 source (and --against artifacts), in one process, runs interleaved.

    A TVM artifact is built for fixed input shapes: --batch and --sequence then come from its manifest
    (the first shape it was built for).
    """

    def action():
        from qcompiler.artifact import open_artifact
        from qcompiler.benchmarking import compare_latency, synthetic_feeds
        from qcompiler.capture import load
        from qcompiler.decoding import PAST_PATTERN

        path, manifest = open_artifact(artifact_dir)
        compiled = _load_onnx(path)
        source = reference or manifest.get("source")
        if not source:
            raise QCompilerError("The manifest records no source; name the FP32 model with --reference.")
        fp32 = load(source)
        if decode:
            if inputs:
                raise QCompilerError("--inputs applies to the one-pass benchmark; --decode draws its prompts itself "
                                     "(set --prompt-length).")
            _bench_decode(artifact_dir, manifest, compiled, fp32, against, batch or 1, prompt_length, new_tokens,
                          runs or 5, threads)
            return
        static = _backend_of(manifest).bench_shape(manifest)
        if inputs:
            feeds = _bench_inputs(inputs, compiled, static)
        else:
            feeds = synthetic_feeds(fp32, *(static or (batch or 8, sequence)))
        models = {"fp32": fp32, "compiled": _session(artifact_dir, manifest, compiled, threads, timed=True)}
        for other in against:
            other_path, other_manifest = open_artifact(other)
            models[os.path.basename(os.path.normpath(other))] = _session(other, other_manifest, _load_onnx(other_path),
                                                                         threads, timed=True)
        rows = compare_latency(models, feeds, runs or 20, threads)
        shown = ", ".join(f"{name} {list(value.shape)}" for name, value in feeds.items()
                          if not PAST_PATTERN.match(name))
        stdout.print(f"{'inputs from ' + inputs if inputs else 'synthetic inputs'}: {shown}; median of {runs or 20} "
                     "runs, interleaved", highlight=False, soft_wrap=True)
        for name, row in rows.items():
            stdout.print(f"{name:10s} median {row['median_ms']:8.2f} ms   ratio to fp32 {row['ratio']:.3f}")

    _guard(debug, action)


def _npz_feeds(path: str, model, command: str) -> dict:
    """Every sample of an .npz of named arrays as one batch for ``model``, checked, with a causal LM's cache filled."""
    from qcompiler.calibration import data as calib_data
    from qcompiler.decoding import cache_layout, complete_feeds

    if not path.endswith(".npz"):
        raise QCompilerError(f"{command} takes an .npz of named input arrays, and '{path}' is not one (text goes to "
                             "'qcompile eval --data' or 'qcompile generate --prompt').")
    data = calib_data.from_npz(path, batch_size=1 << 30)
    layout = cache_layout(model)
    if layout is not None:  # a causal LM's prompt: the cache starts empty, positions follow the mask
        data.batches = [complete_feeds(layout, batch) for batch in data.batches]
    calib_data.validate(data, model, what=f"the inputs in '{path}'")
    return data.batches[0]


def _bench_inputs(path: str, model, static: tuple[int, int] | None) -> dict:
    """The feeds ``bench --inputs`` times: every sample of the .npz in one run, at a fixed-shape library's shape."""
    feeds = _npz_feeds(path, model, "bench --inputs")
    if static is not None and next(iter(feeds.values())).shape[:2] != tuple(static):
        raise QCompilerError(f"The library is built for batch x sequence {static[0]}x{static[1]}, and the arrays in "
                             f"'{path}' are {'x'.join(map(str, next(iter(feeds.values())).shape[:2]))}.")
    return feeds


def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise QCompilerError(f"--prompt-ids must be comma-separated token ids (e.g. 1,2,3), not '{text}'.") from None
    if not ids or any(i < 0 for i in ids):
        raise QCompilerError(f"--prompt-ids must hold at least one non-negative token id, not '{text}'.")
    return ids


@main.command("generate")
@click.argument("artifact_dir")
@click.option("--prompt", help="Text to continue (tokenized with the model's tokenizer, or --tokenizer).")
@click.option("--prompt-ids", help="Token ids to continue, comma-separated (instead of --prompt).")
@click.option("--tokenizer", help="Tokenizer folder, when the artifact records none.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy; above 0: sampling from softmax(logits / T).")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="With --temperature: sample from the smallest set of tokens whose probability reaches P.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=0, help="Threads for the runtime (0: its default).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def generate_command(artifact_dir, prompt, prompt_ids, tokenizer, max_new_tokens, temperature, top_p, seed, threads,
                     debug) -> None:
    """Generate from the causal LM in ARTIFACT_DIR with its KV cache; stream the text, then tokens/s."""

    def action():
        import numpy as np

        from qcompiler import decoding
        from qcompiler.artifact import open_artifact
        from qcompiler.capture import TOKENIZER_KEY, load_tokenizer

        if (prompt is None) == (prompt_ids is None):
            raise QCompilerError("Give exactly one of --prompt TEXT and --prompt-ids 1,2,3.")
        path, manifest = open_artifact(artifact_dir)
        model = _load_onnx(path)
        layout = decoding.require_layout(model, "qcompile generate")
        if _backend_of(manifest).bench_shape(manifest) is not None:
            raise QCompilerError(f"The {manifest.get('backend')} library of '{artifact_dir}' is built for fixed shapes "
                                 "and runs the prompt only; decoding needs symbolic past lengths, which this backend "
                                 "does not build yet: compile with --backend ort to generate.")
        folder = tokenizer or model.metadata_props.get(TOKENIZER_KEY)
        text_tokenizer = load_tokenizer(folder) if folder else None
        if prompt is not None:
            if text_tokenizer is None:
                raise QCompilerError("--prompt needs a tokenizer and the artifact records none; name one with "
                                     "--tokenizer, or give --prompt-ids.")
            ids = list(text_tokenizer(prompt)["input_ids"])
            if not ids:
                raise QCompilerError("The prompt tokenizes to no tokens.")
        else:
            ids = _prompt_ids(prompt_ids)
        vocab = decoding.generation_settings(model).get("vocab_size")
        if isinstance(vocab, int) and max(ids) >= vocab:
            raise QCompilerError(f"Token id {max(ids)} is outside the model's vocabulary of {vocab}.")
        decoding.check_prompt_length(model, len(ids), max_new_tokens)
        session = _session(artifact_dir, manifest, model, threads)
        produced: list[int] = []
        shown = [""]

        def stream(step: np.ndarray) -> None:
            produced.append(int(step[0]))
            if text_tokenizer is None:
                sys.stdout.write(("" if len(produced) == 1 else ",") + str(produced[-1]))
            else:
                text = text_tokenizer.decode(produced, skip_special_tokens=True)
                sys.stdout.write(text[len(shown[0]):])
                shown[0] = text
            sys.stdout.flush()

        if text_tokenizer is not None:
            sys.stdout.write(prompt if prompt is not None else text_tokenizer.decode(ids, skip_special_tokens=True))
        result = decoding.generate(session, layout, np.asarray([ids]), max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, seed=seed,
                                   eos_token_id=decoding.generation_settings(model).get("eos_token_id"),
                                   on_step=stream)
        sys.stdout.write("\n")
        console.print(f"{len(ids)} prompt tokens in {result.prefill_seconds * 1e3:.1f} ms "
                      f"({len(ids) / max(result.prefill_seconds, 1e-9):.1f} tokens/s); {result.tokens.shape[1]} new "
                      f"tokens, decode {result.decode_tokens_per_second:.1f} tokens/s", highlight=False)

    _guard(debug, action)


def _bench_decode(artifact_dir, manifest: dict, compiled, fp32, against, batch: int, prompt_length: int,
                  new_tokens: int, runs: int, threads: int) -> None:
    """Prefill ms and decode tokens/s of the FP32 source, the artifact and ``against``, interleaved in one process."""
    from qcompiler import decoding
    from qcompiler.benchmarking import compare_decode, embedding_rows
    from qcompiler.runtime import make_session

    contenders = {"fp32": (make_session(fp32, threads=threads, spinning=False),
                           decoding.require_layout(fp32, "bench --decode"))}
    for name, folder, folder_manifest, model in [("compiled", artifact_dir, manifest, compiled),
                                                 *[(os.path.basename(os.path.normpath(o)), o, *_opened(o))
                                                   for o in against]]:
        if _backend_of(folder_manifest).bench_shape(folder_manifest) is not None:
            raise QCompilerError(f"'{folder}' is a fixed-shape library that cannot decode; bench --decode needs an "
                                 "ORT or simulate artifact.")
        contenders[name] = (_session(folder, folder_manifest, model, threads, timed=True),
                            decoding.require_layout(model, "bench --decode"))
    decoding.check_prompt_length(compiled, prompt_length, new_tokens)
    ids = next(v for v in fp32.graph.inputs if v.name == decoding.TOKENS)
    vocabulary = decoding.generation_settings(compiled).get("vocab_size") or embedding_rows(ids) or 1000
    rows = compare_decode(contenders, batch=batch, prompt_length=prompt_length, new_tokens=new_tokens,
                          vocabulary=vocabulary, runs=runs)
    stdout.print(f"batch {batch}, prompt {prompt_length} tokens, {new_tokens} new tokens, median of {runs} runs")
    for name, row in rows.items():
        stdout.print(f"{name:10s} prefill {row['prefill_ms']:8.2f} ms   decode {row['decode_tokens_per_s']:9.1f} "
                     f"tokens/s   decode ratio to fp32 {row['decode_ratio']:.3f}")


def _opened(folder) -> tuple[dict, Any]:
    """The manifest and model of an artifact folder."""
    from qcompiler.artifact import open_artifact

    path, manifest = open_artifact(folder)
    return manifest, _load_onnx(path)


def _backend_of(manifest: dict):
    """The backend that wrote an artifact, as its manifest records it."""
    name = manifest.get("backend")
    if name not in backend_names():
        raise QCompilerError(f"The manifest names backend '{name}', which this qcompiler does not have; "
                             f"it has {', '.join(backend_names())}.")
    return make_backend(name)


def _session(folder, manifest: dict, model, threads: int = 0, timed: bool = False):
    """What runs an artifact: the session of the backend that wrote it (``timed``: its pool does not spin)."""
    return _backend_of(manifest).session(Path(folder), manifest, model, threads=threads, timed=timed)


def _load_onnx(path):
    import onnx_ir as ir

    try:
        return ir.load(path)
    except Exception as exc:
        raise QCompilerError(f"'{path}' is not a readable ONNX model: {str(exc).splitlines()[0]}") from None
