"""The compressed-tensors backend: the artifact is also a Hugging Face checkpoint vLLM and transformers load.

``qcompile HF_FOLDER --passes ... --format compressed-tensors -o DIR`` writes ``config.json``
(with its ``quantization_config``), ``model.safetensors`` and the tokenizer beside the
usual ``model.onnx`` (the simulate form, which ``qcompile eval``/``run``/``generate`` read)
and reports. Before anything is written, the checkpoint is loaded back with transformers
(decompressed, on the CPU) and its outputs on a held-out batch are compared with the
simulate model's: a checkpoint that does not compute what was compiled is qcompiler's
bug (exit 1), never a file left for the user to find out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompiler.backend import Backend, LowerContext, Lowered, Lowering, register_backend
from qcompiler.backends.compressed_tensors import checkpoint
from qcompiler.calibration.data import real_tokens, token_mask
from qcompiler.decoding import cache_layout, complete_feeds
from qcompiler.errors import QCompilerBug
from qcompiler.quant.annotation import annotated_layers
from qcompiler.runtime import make_session

# Relative error allowed between the checkpoint as transformers loads it and the simulate model with its activations
# left float (that load runs them in float): the weights are the same numbers, so only float32 rounding is left.
TOLERANCE = 1e-3
LAYER_TOLERANCE = 1e-5


@register_backend
class CompressedTensorsBackend(Backend):
    name = "compressed-tensors"
    summary = ("a Hugging Face checkpoint in compressed-tensors' layout (config.json + safetensors) that vLLM and "
               "transformers load, beside the simulate model.onnx; integer presets, offline transforms")

    def accepts(self, model: ir.Model) -> None:
        checkpoint.source_folder(model)

    def lower(self, model: ir.Model, ctx: LowerContext) -> Lowered:
        staging = tempfile.TemporaryDirectory(prefix="qcompiler-ct-")
        folder = Path(staging.name)
        with _no_progress_bars():
            config = checkpoint.write(model, folder)
            weights_error = checkpoint.layer_error(model, folder, config)
        if weights_error > LAYER_TOLERANCE:
            raise QCompilerBug(f"qcompiler produced a compressed-tensors checkpoint whose decompressed weights differ "
                               f"from the compiled model's by {weights_error:.3g}; nothing was written; please report it")
        single = len(config.get("config_groups", {})) == 1
        with _no_progress_bars():
            error = _check(model, folder, ctx) if single else None
        layers = {a.layer: f"compressed-tensors {config.get('format', '')} ({a.scheme.describe()})"
                  for _, a in annotated_layers(model)}

        def copy_checkpoint(path: Path) -> None:
            # The checkpoint is several files (config, weights, tokenizer): all go beside model.onnx.
            shutil.copytree(folder, path.parent, dirs_exist_ok=True)
            staging.cleanup()

        notes = [f"compressed-tensors checkpoint (format {config.get('format')}): every layer decompresses to the "
                 f"compiled weights (relative error {weights_error:.1g})"]
        if error is not None:
            activations = any(a.activation is not None for _, a in annotated_layers(model))
            notes.append(f"transformers' decompressed load of the checkpoint matches the simulate model on a held-out "
                         f"batch to relative error {error:.2g}" + (
                             " with activations float, as that load runs them (vLLM quantizes them as the config "
                             "says)" if activations else ""))
        elif not single:
            notes.append(f"the checkpoint has {len(config['config_groups'])} quantization groups (mixed precision): "
                         "vLLM loads each with its own scheme; transformers 5's dequantizing load applies the first "
                         "group to every layer, so load it there only with one preset (e.g. head=same or "
                         "skip=lm_head)")
        return Lowered(model, Lowering(simulated=layers), files={"model.safetensors": copy_checkpoint},
                       manifest={"compressed_tensors": config}, notes=notes)


@contextlib.contextmanager
def _no_progress_bars():
    """compressed-tensors and transformers draw tqdm bars per module; the compile has its own progress."""
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE")
        else:
            os.environ["TQDM_DISABLE"] = previous


def _weights_only(model: ir.Model) -> ir.Model:
    """A copy of the simulate model whose linears read their float inputs: the quantized weights alone."""
    copy = ir.from_proto(ir.to_proto(model))
    values = {v.name: v for node in copy.graph for v in node.outputs}
    values.update({v.name: v for v in copy.graph.inputs})
    for node, annotation in annotated_layers(copy):
        if annotation.activation is not None and annotation.activation.source in values:
            node.replace_input_with(0, values[annotation.activation.source])
    return copy


def _check(model: ir.Model, folder: Path, ctx: LowerContext) -> float | None:
    """Relative error of the checkpoint, loaded by transformers, against the simulate model on one held-out batch."""
    import torch
    import transformers

    if ctx.holdout is None or not ctx.holdout.batches:
        return None
    batch = ctx.holdout.batches[0]
    layout = cache_layout(model)
    feeds = complete_feeds(layout, batch) if layout is not None else batch
    expected = make_session(_weights_only(model)).run(None, feeds)[0]
    _, loaded = checkpoint.load_hf_module(folder, quantization_config=transformers.CompressedTensorsConfig(
        dequantize=True))
    with torch.no_grad():
        got = loaded(**{k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()})[0].numpy()
    mask = token_mask(batch)
    expected, got = real_tokens(expected, mask), real_tokens(got, mask)
    error = float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-12))
    if error > TOLERANCE:
        raise QCompilerBug(f"qcompiler produced a compressed-tensors checkpoint whose outputs differ from the compiled "
                           f"model by relative error {error:.3g}; nothing was written; please report it")
    return error
