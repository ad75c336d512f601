"""A compiled Hugging Face model as a compressed-tensors checkpoint: the layout llm-compressor writes and vLLM loads.

The compiled graph holds everything the checkpoint needs: each quantized linear's codes,
scales and zero points (its DequantizeLinear), and every parameter the transforms
rewrote offline (smooth's and rotate's scales folded into norms, embeddings and weights).
Each is mapped back to the Hugging Face module it came from by module path (the
exporter's name scopes, which normalization keeps on the fused norms), written into the
float32 module, and compressed by the ``compressed-tensors`` package itself: 4-bit codes
packed into int32 (``pack-quantized``), 8-bit codes stored as int8 (``int-quantized``).

The codes are not re-derived: compressed-tensors computes ``q = round(w / s) + z`` from
the dequantized weight ``w = (q0 - z0) s`` and qcompiler's ``s``, with ``z = z0 - 2^(b-1)``
(its integers are signed, qcompiler's 4-bit codes unsigned), which gives back ``q0``
shifted, exactly. What the format cannot hold is refused in one sentence: online
rotations (it has no transform for qcompiler's Hadamard factors), elementwise
compensations a transform left in the graph (no module has a parameter for them), a quantized KV cache,
convolutions, float and block formats (for now), and biases the architecture lacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.absorb import COMPENSATION
from qcompiler.analysis.linears import constant_array, find_linears, module_path
from qcompiler.capture import SOURCE_KEY, load_hf_module, load_tokenizer
from qcompiler.decoding import cache_layout
from qcompiler.errors import QCompilerError
from qcompiler.online_rotation import DOMAIN as ONLINE_DOMAIN
from qcompiler.quant.annotation import ActivationAnnotation, LayerAnnotation, annotated_layers
from qcompiler.quant.spec import QuantSpec, quantize

NORMS = ("LayerNormalization", "RMSNormalization")


@dataclass
class LinearState:
    """One Hugging Face linear as the compiled graph has it (weights in Hugging Face's ``[out, in]`` layout)."""

    weight: np.ndarray
    bias: np.ndarray | None
    annotation: LayerAnnotation | None = None
    scale: np.ndarray | None = None  # compressed-tensors layout: [out, 1] per channel, [out, in / g] per group
    zero_point: np.ndarray | None = None  # signed, same layout
    input_scale: np.ndarray | None = None  # static activations: [1]
    input_zero_point: np.ndarray | None = None


def source_folder(model: ir.Model) -> Path:
    """The Hugging Face folder the model was captured from; one sentence when it was not captured from one."""
    source = model.metadata_props.get(SOURCE_KEY)
    folder = Path(source) if source else None
    if folder is None or not (folder / "config.json").is_file():
        raise QCompilerError("A compressed-tensors checkpoint is written for models captured from a Hugging Face "
                             f"folder (config.json and weights); this one came from {source or 'elsewhere'}.")
    return folder


def refusal(model: ir.Model) -> str | None:
    """Why the compiled model cannot be written as a compressed-tensors checkpoint, or None."""
    online = sum(1 for node in model.graph if node.domain == ONLINE_DOMAIN)
    if online:
        return (f"The pipeline rotates {online} activation(s) online, which compressed-tensors cannot express with "
                "qcompiler's Hadamard factors: use rotate(mode=offline), or deploy the ONNX artifact.")
    compensations = sum(1 for node in model.graph if COMPENSATION in node.metadata_props)
    if compensations:
        return (f"The pipeline inserted {compensations} elementwise compensation(s) (a Mul or Add in front of readers a "
                "transform could not fold into, such as a post-norm residual), which the Hugging Face architecture "
                "has no parameter for: drop smooth/shift for this format, or deploy the ONNX artifact.")
    layout = cache_layout(model)
    if layout is not None and layout.quantized:
        return "compressed-tensors has no form for qcompiler's int8/int4 KV cache: drop kv= for this format."
    for node, annotation in annotated_layers(model):
        if node.op_type != "MatMul":
            return (f"compressed-tensors stores linear weights, and {annotation.layer} is a quantized {node.op_type}: "
                    f"keep it float with skip={annotation.layer}.")
        problem = _spec_problem(annotation.weight.spec, "weights") or (
            _spec_problem(annotation.activation.spec, "activations") if annotation.activation else None)
        if problem:
            return f"{annotation.layer} ({annotation.preset}): {problem}."
    return None


def _spec_problem(spec: QuantSpec, role: str) -> str | None:
    if spec.element.kind != "int" and spec.format != "fp8-e4m3":
        return (f"the compressed-tensors writer takes integer and FP8 {role} so far (w8a8, w8a8-dyn, w8a16, w4a16, "
                f"w4a8, w4a4, fp8), not {spec.describe()}")
    if spec.granularity not in ("tensor", "channel", "group", "token"):
        return f"compressed-tensors has no {spec.granularity} granularity for {role}"
    return None


def quantization_args(spec: QuantSpec, role: str) -> dict[str, Any]:
    """compressed-tensors' QuantizationArgs fields for a qcompiler spec (signed integers of the same width)."""
    args: dict[str, Any] = {"num_bits": spec.element.bits, "type": spec.element.kind, "symmetric": spec.symmetric,
                            "strategy": spec.granularity, "dynamic": spec.dynamic}
    if spec.granularity == "group":
        args["group_size"] = spec.group_size
    if role == "weights":
        args["observer"] = "minmax"
    return args


def linear_states(model: ir.Model) -> dict[str, LinearState]:
    """Every linear of the compiled graph by module path: quantized ones with their codes' scales, float ones as they are."""
    states: dict[str, LinearState] = {}
    for node, annotation in annotated_layers(model):
        weight, scale, zero = _dequantize(node.inputs[1], annotation.weight.spec)
        state = LinearState(weight.T, _bias(node), annotation, scale, zero)
        activation = annotation.activation
        if activation is not None and not activation.spec.dynamic:
            state.input_scale, state.input_zero_point = _static_input(activation)
        states[annotation.layer] = state
    for linear in find_linears(model.graph):
        if linear.layer not in states:
            weight = constant_array(linear.weight).astype(np.float32)
            bias = constant_array(linear.bias) if linear.bias is not None else None
            states[linear.layer] = LinearState(weight.T, bias)
    return states


def other_parameters(model: ir.Model) -> dict[str, np.ndarray]:
    """Norm scales and biases and embedding tables by Hugging Face parameter name (``model.norm.weight``)."""
    found: dict[str, np.ndarray] = {}
    for node in model.graph:
        if node.op_type in NORMS:
            path = module_path(node, ((node.inputs[1], ".weight"),), "")
            if path:
                found[f"{path}.weight"] = constant_array(node.inputs[1])
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    found[f"{path}.bias"] = constant_array(node.inputs[2])
        elif node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].is_initializer():
            path = module_path(node, ((node.inputs[0], ".weight"),), "")
            if path:
                found[f"{path}.weight"] = constant_array(node.inputs[0])
    return {name: value for name, value in found.items() if value is not None}


def _dequantize(value: ir.Value, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``[C_in, C_out]`` weight as the graph computes it, with scales and signed zero points in ``[out, ...]`` layout."""
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear":
        raise QCompilerError("A quantized linear's weight is stored pre-dequantized, which compressed-tensors cannot "
                             "pack; this preset has no integer storage here.")
    codes = node.inputs[0].const_value.numpy().astype(np.float32)
    scale = node.inputs[1].const_value.numpy().astype(np.float32)
    zero = (node.inputs[2].const_value.numpy().astype(np.float32)
            if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros_like(scale))
    block = node.attributes["block_size"].value if "block_size" in node.attributes else 0
    if block:  # groups along the input axis 0: scale [C_in / g, C_out]
        expand = lambda a: np.repeat(a, block, axis=0)[:codes.shape[0]]  # noqa: E731
        weight = (codes - expand(zero)) * expand(scale)
        scale_out, zero_out = scale.T, zero.T
    else:  # per output channel: scale [C_out]
        weight = (codes - zero) * scale
        scale_out, zero_out = scale[:, None], zero[:, None]
    offset = 2 ** (spec.element.bits - 1) if spec.format.startswith("uint") else 0
    return weight, scale_out, None if spec.symmetric else zero_out - offset


def _static_input(activation: ActivationAnnotation) -> tuple[np.ndarray, np.ndarray]:
    """The scale and signed zero point of a static activation, from the range the quantize pass fixed.

    The same fit as the simulate form's (`qcompiler.quant.spec.quantize` on the range), so
    the checkpoint's ``input_scale`` is the graph's scale; int8 zero points are already signed.
    """
    lo, hi = activation.range
    fitted = quantize(np.array([lo, hi], np.float32), activation.spec, "activation",
                      bounds=(np.float32(lo), np.float32(hi)))
    zero = 0.0 if fitted.zero_point is None else float(np.asarray(fitted.zero_point).reshape(-1)[0])
    return np.asarray(fitted.scale, np.float32).reshape(1), np.array([zero], np.float32)


def _bias(matmul: ir.Node) -> np.ndarray | None:
    """The constant bias added to a linear's MatMul output, if any."""
    uses = list(matmul.outputs[0].uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add":
        other = uses[0].node.inputs[1 - uses[0].idx]
        bias = constant_array(other)
        if bias is not None and bias.ndim == 1:
            return bias
    return None


def write(model: ir.Model, folder: Path) -> dict[str, Any]:
    """Write the checkpoint of ``model`` into ``folder``; returns its quantization config (as config.json has it)."""
    import json

    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config

    problem = refusal(model)
    if problem:
        raise QCompilerError(problem)
    source = source_folder(model)
    _, module = load_hf_module(source)
    states = linear_states(model)
    named = dict(module.named_modules())
    _untie_quantized_heads(module, states)
    parameters = dict(module.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for path, state in states.items():
            linear = named.get(path)
            if not isinstance(linear, torch.nn.Linear) or tuple(linear.weight.shape) != state.weight.shape:
                raise QCompilerError(f"The compiled linear {path} has no Linear of shape {state.weight.shape} in the "
                                     "Hugging Face model (a Conv1D or fused layer); this format cannot place it.")
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(state.weight)))
            if state.bias is not None:
                if linear.bias is None:
                    raise QCompilerError(f"The pipeline gave {path} a bias (shift moves a mean into it) that the "
                                         "architecture does not have; drop shift for this format.")
                linear.bias.copy_(torch.from_numpy(state.bias.astype(np.float32)))
        for name, value in other_parameters(model).items():
            if name in parameters and tuple(parameters[name].shape) == value.shape:
                parameters[name].copy_(torch.from_numpy(value.astype(np.float32)))
    groups, targets = {}, {}
    for path, state in states.items():
        if state.annotation is None:
            continue
        a = state.annotation
        key = (a.weight.spec, a.activation.spec if a.activation else None)
        targets.setdefault(key, []).append(path)
    for index, ((weight_spec, activation_spec), paths) in enumerate(targets.items()):
        groups[f"group_{index}"] = QuantizationScheme(
            targets=[f"re:^{p.replace('.', '[.]')}$" for p in paths],
            weights=quantization_args(weight_spec, "weights"),
            input_activations=quantization_args(activation_spec, "activations") if activation_spec else None)
    ignore = [path for path, state in states.items() if state.annotation is None]
    config = QuantizationConfig(config_groups=groups, ignore=ignore)
    apply_quantization_config(module, config)
    with torch.no_grad():
        for path, state in states.items():
            if state.annotation is None:
                continue
            linear = named[path]
            linear.weight_scale.copy_(torch.from_numpy(state.scale).reshape(linear.weight_scale.shape))
            if state.zero_point is not None:
                linear.weight_zero_point.copy_(torch.from_numpy(state.zero_point).reshape(
                    linear.weight_zero_point.shape).to(linear.weight_zero_point.dtype))
            if state.input_scale is not None:
                linear.input_scale.copy_(torch.from_numpy(state.input_scale).reshape(linear.input_scale.shape))
                if hasattr(linear, "input_zero_point"):
                    linear.input_zero_point.copy_(torch.from_numpy(state.input_zero_point).reshape(
                        linear.input_zero_point.shape).to(linear.input_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(module)
    compressor.compress_model(module)
    module.save_pretrained(folder)
    compressor.update_config(folder)
    tokenizer = load_tokenizer(source, required=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))["quantization_config"]


def layer_error(model: ir.Model, folder: Path, config: dict[str, Any]) -> float:
    """Worst relative error of a layer's weight as compressed-tensors decompresses it from ``folder``, against the graph.

    Each layer is decompressed with its own config group's scheme, which is what vLLM does;
    transformers 5's dequantizing load applies the first group to every dense layer, so
    a checkpoint with several groups (an 8-bit head, a fallback) is checked here, layer by layer.
    """
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    parsed = QuantizationConfig.model_validate(config)
    worst = 0.0
    states = linear_states(model)
    for group in parsed.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(group.format or parsed.format)
        for target in group.targets:
            path = target.removeprefix("re:^").removesuffix("$").replace("[.]", ".")
            local = {key[len(path) + 1:]: value for key, value in tensors.items() if key.startswith(path + ".")}
            weight = compressor.decompress(local, group)["weight"].numpy()
            expected = states[path].weight
            worst = max(worst, float(np.abs(weight - expected).max() / max(np.abs(expected).max(), 1e-12)))
    return worst


def _untie_quantized_heads(module: Any, states: dict[str, LinearState]) -> None:
    """Give a quantized LM head tied to the input embedding its own weight (the embedding stays float)."""
    import torch

    head = getattr(module, "get_output_embeddings", lambda: None)()
    embedding = getattr(module, "get_input_embeddings", lambda: None)()
    if head is None or embedding is None or head.weight is not embedding.weight:
        return
    if not any(state.annotation is not None and getattr(module.get_submodule(path), "weight", None) is head.weight
               for path, state in states.items()):
        return
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    module.config.tie_word_embeddings = False
    if hasattr(module.config, "get_text_config"):
        module.config.get_text_config().tie_word_embeddings = False
