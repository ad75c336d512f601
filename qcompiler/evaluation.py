"""Fidelity of a compiled model against its reference, on data the user chooses.

Token tensors are compared at real tokens only (the batch's padding mask). Per output: max and mean absolute error, cosine and SQNR over every element. For
embedding models (a ``[batch, tokens, hidden]`` output and a padding mask among the
inputs): sentence embeddings by masked mean pooling and L2 normalisation, then the
mean and minimum cosine to the reference embedding of the same sentence and
nearest-neighbour agreement (the fraction of sentences whose most similar other
sentence is the same under both models), which is what retrieval depends on. For causal
LMs (a KV cache among the inputs): the logits only, as next-token metrics
(`qcompiler.next_token`: top-1 agreement, KL, perplexity); the cache is internal state.
Per layer: output SQNR of every linear, matched by module path, since transforms keep
each linear's output unchanged and only quantization moves it (a producer that absorbed a
transform is marked instead: its output is in another basis); weight SQNR as the quantize
pass recorded it in the layer's annotation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from rich.table import Table

from qcompiler.absorb import OUTPUT_TRANSFORMED
from qcompiler.analysis.linears import Linear
from qcompiler.calibration.data import real_tokens, token_mask
from qcompiler.decoding import PRESENT_PATTERN, cache_layout, refill
from qcompiler.errors import QCompilerError
from qcompiler.next_token import next_token_metrics
from qcompiler.quant.annotation import LayerAnnotation, annotated_layers
from qcompiler.runtime import make_session, run_batches


@dataclass
class Evaluation:
    outputs: dict[str, dict[str, float]]
    embedding: dict[str, float] | None
    layers: list[dict] = field(default_factory=list)
    samples: int = 0
    next_token: dict[str, float] | None = None
    perplexity: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def tables(self) -> list[Table]:
        outputs = Table(title=f"fidelity on {self.samples} samples", title_justify="left")
        for header in ("output", "max abs", "mean abs", "cosine", "SQNR dB"):
            outputs.add_column(header, justify="left" if header == "output" else "right")
        for name, m in self.outputs.items():
            outputs.add_row(name, f"{m['max_abs_error']:.3g}", f"{m['mean_abs_error']:.3g}", f"{m['cosine']:.6f}",
                            f"{m['sqnr_db']:.1f}")
        tables = [outputs] if self.outputs else []
        if self.embedding:
            e = self.embedding
            embedding = Table(title=f"sentence embeddings ({e['output']}, mean pooled)", title_justify="left")
            for header in ("mean cosine", "min cosine", "nearest-neighbour agreement"):
                embedding.add_column(header, justify="right")
            embedding.add_row(f"{e['mean_cosine']:.5f}", f"{e['min_cosine']:.5f}", f"{e['neighbour_agreement']:.3f}")
            tables.append(embedding)
        if self.next_token:
            n = self.next_token
            table = Table(title=f"next tokens ({n['positions']} positions)", title_justify="left")
            for header in ("top-1 agreement", "mean KL (nats)", "perplexity, source", "perplexity, compiled"):
                table.add_column(header, justify="right")
            table.add_row(f"{n['top1_agreement']:.4f}", f"{n['mean_kl']:.4g}", f"{n['reference_perplexity']:.4f}",
                          f"{n['perplexity']:.4f}")
            tables.append(table)
        if self.perplexity:
            p = self.perplexity
            table = Table(title=f"perplexity of {p['text']} ({p['tokens']} tokens, window {p['window']}, stride "
                                f"{p['stride']})", title_justify="left")
            for header in ("source", "compiled", "ratio"):
                table.add_column(header, justify="right")
            table.add_row(f"{p['reference']:.4f}", f"{p['compiled']:.4f}", f"{p['compiled'] / p['reference']:.4f}")
            tables.append(table)
        if self.layers:
            layers = Table(title="per layer", title_justify="left")
            for header in ("layer", "scheme", "weight SQNR dB", "output SQNR dB"):
                layers.add_column(header, justify="left" if header in ("layer", "scheme") else "right")
            for layer in self.layers:
                weight = "-" if layer["weight_sqnr_db"] is None else f"{layer['weight_sqnr_db']:.1f}"
                output = (f"transformed ({layer['output_transformed_by']})" if layer["output_sqnr_db"] is None
                          else f"{layer['output_sqnr_db']:.1f}")
                layers.add_row(layer["layer"], layer["scheme"], weight, output)
            tables.append(layers)
        return tables


def evaluate(reference: ir.Model, candidate: ir.Model, batches: Sequence[Mapping[str, np.ndarray]]) -> Evaluation:
    """Compare ``candidate`` with ``reference`` on ``batches`` (their outputs must share names)."""
    ref_layers, cand_layers = layer_outputs(reference), layer_outputs(candidate)
    shared = [layer for layer in cand_layers if layer in ref_layers]
    causal = cache_layout(reference) is not None
    # A causal LM's cache is state a transform may store in another basis; its logits are what users see.
    outputs = [v.name for v in reference.graph.outputs if not (causal and PRESENT_PATTERN.match(v.name))]
    missing = [name for name in outputs if name not in {v.name for v in candidate.graph.outputs}]
    if missing:
        raise QCompilerError(f"The compiled model has no output '{missing[0]}' that the reference has.")
    ref_runs = run_batches(make_session(reference, [ref_layers[n] for n in shared]), batches)
    cand_layout = cache_layout(candidate)
    cand_batches = [refill(cand_layout, b) for b in batches] if causal and cand_layout is not None else batches
    cand_runs = run_batches(make_session(candidate, [cand_layers[n] for n in shared]), cand_batches)
    masks = [token_mask(dict(b)) for b in batches]

    def real(runs: list[dict], name: str) -> list[np.ndarray]:
        # Padding positions compute values nothing downstream reads; they are not fidelity.
        return [real_tokens(run[name], mask) for run, mask in zip(runs, masks)]

    result = Evaluation({name: output_metrics(real(ref_runs, name), real(cand_runs, name)) for name in outputs},
                        None, samples=sum(len(next(iter(b.values()))) for b in batches))
    if causal:
        result.next_token = next_token_metrics(ref_runs, cand_runs, batches)
    else:
        result.embedding = embedding_metrics(outputs, ref_runs, cand_runs, batches)
    annotations = {a.layer: a for _, a in annotated_layers(candidate)}
    transformed_layers = _transformed(candidate)
    for layer in shared:
        ref_values = real(ref_runs, ref_layers[layer])
        cand_values = real(cand_runs, cand_layers[layer])
        annotation = annotations.get(layer)
        transformed = transformed_layers.get(layer)
        result.layers.append({
            "layer": layer,
            "scheme": annotation.scheme.describe() if annotation else "float",
            "weight_sqnr_db": annotation.weight_sqnr_db if annotation else None,
            # A producer that absorbed a transform emits a different (equivalent) basis.
            "output_sqnr_db": None if transformed else output_metrics(ref_values, cand_values)["sqnr_db"],
            "output_transformed_by": transformed,
        })
    return result


def output_metrics(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, float]:
    ref = np.concatenate([np.asarray(a, np.float64).ravel() for a in reference])
    new = np.concatenate([np.asarray(a, np.float64).ravel() for a in candidate])
    diff = ref - new
    norms = float(np.linalg.norm(ref) * np.linalg.norm(new))
    noise = float(np.sum(diff * diff))
    signal = float(np.sum(ref * ref))
    return {
        "max_abs_error": float(np.abs(diff).max()) if diff.size else 0.0,
        "mean_abs_error": float(np.abs(diff).mean()) if diff.size else 0.0,
        "cosine": float(ref @ new / norms) if norms > 0 else float(np.array_equal(ref, new)),
        "sqnr_db": float(10 * np.log10(signal / noise)) if noise > 0 and signal > 0 else float("inf"),
    }


def sentence_embeddings(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked mean pooling then L2 normalisation (sentence-transformers' recipe)."""
    weights = mask[..., None].astype(np.float64)
    pooled = (hidden.astype(np.float64) * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def embedding_metrics(outputs: Sequence[str], ref_runs: list[dict], cand_runs: list[dict],
                      batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float] | None:
    """Sentence-embedding fidelity from the first ``[batch, tokens, hidden]`` output, if the inputs carry a mask."""
    masks = [token_mask(dict(b)) for b in batches]
    if any(m is None for m in masks):
        return None
    for name in outputs:
        if all(r[name].ndim == 3 and r[name].shape[:2] == m.shape for r, m in zip(ref_runs, masks)):
            ref = np.concatenate([sentence_embeddings(r[name], m) for r, m in zip(ref_runs, masks)])
            new = np.concatenate([sentence_embeddings(c[name], m) for c, m in zip(cand_runs, masks)])
            cosines = np.sum(ref * new, axis=1)
            return {"output": name, "mean_cosine": float(cosines.mean()), "min_cosine": float(cosines.min()),
                    "neighbour_agreement": neighbour_agreement(ref, new)}
    return None


def neighbour_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Fraction of rows whose nearest other row (by cosine) is the same in both embeddings."""
    if len(reference) < 2:
        return 1.0

    def nearest(e: np.ndarray) -> np.ndarray:
        similarity = e @ e.T
        np.fill_diagonal(similarity, -np.inf)
        return similarity.argmax(axis=1)

    return float(np.mean(nearest(reference) == nearest(candidate)))


def layer_outputs(model: ir.Model) -> dict[str, str]:
    """Module path -> output value name of every linear: float, simulated, or lowered to a kernel.

    Quantized layers are found by their annotation (which lowering keeps on the node that
    produces the layer's output); float ones as MatMuls with a constant 2-D weight.
    """
    result: dict[str, str] = {}
    for node in model.graph:
        annotation = LayerAnnotation.from_node(node)
        if annotation is not None:
            layer = annotation.layer
        elif _is_float_linear(node):
            layer = Linear(node, node.inputs[1], None, None).layer
        else:
            continue
        output = node.outputs[0]
        uses = list(output.uses())
        if len(uses) == 1 and uses[0].node.op_type == "Add" and not output.is_graph_output():
            bias = uses[0].node.inputs[1 - uses[0].idx]
            output = uses[0].node.outputs[0]
            if annotation is None:
                layer = Linear(node, node.inputs[1], uses[0].node, bias).layer
        result.setdefault(layer, output.name)
    return result


def _is_float_linear(node: ir.Node) -> bool:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    weight = node.inputs[1]
    producer = weight.producer() if weight is not None else None
    constant = weight is not None and (weight.const_value is not None or
                                       (producer is not None and producer.op_type in ("Constant", "DequantizeLinear")))
    return constant and weight.shape is not None and len(weight.shape) == 2


def _transformed(model: ir.Model) -> dict[str, str]:
    """Module path -> the passes whose transform this linear's output carries."""
    found = {}
    for node in model.graph:
        if OUTPUT_TRANSFORMED in node.metadata_props:
            annotation = LayerAnnotation.from_node(node)
            layer = annotation.layer if annotation is not None else Linear(node, node.inputs[1], None, None).layer
            found[layer] = node.metadata_props[OUTPUT_TRANSFORMED]
    return found
