"""An ONNX file qcompiler did not export: PaddleOCR's text-direction classifier (Paddle2ONNX, opset 11, 53 Conv).

    .venv/bin/python examples/foreign_onnx.py [--passes "equalize,w8a8"] [-o out/ocr] [--smoke]

The file ships in the rapidocr-onnxruntime wheel with real pre-trained weights. The data
are text lines rendered with Pillow, every other one upside down: the classifier must say
which. Calibration lines and held-out lines are different sentences. Measured 2026-12-02
(``equalize,w8a8`` on onnxruntime, 279 held-out lines): the same accuracy as FP32 (see
docs/benchmarks.md, CNN section). ``--smoke`` uses 32 and 32 lines.
"""

from __future__ import annotations

import argparse
from importlib.resources import files

import numpy as np
import onnxruntime as ort

import qcompiler
from qcompiler.testing import ocr_classifier_path, text_line_images


def lines(name: str, count: int) -> list[str]:
    text = (files("qcompiler") / "data" / name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="equalize,w8a8")
    parser.add_argument("-o", "--output", default="out/ocr")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()

    calibration, _ = text_line_images(lines("calibration.txt", 32 if args.smoke else 128))
    images, labels = text_line_images(lines("heldout.txt", 32 if args.smoke else 279))
    source = ocr_classifier_path()
    name = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    batches = [{name: calibration[i:i + 8]} for i in range(0, len(calibration), 8)]
    result = qcompiler.compile(str(source), args.passes, calib=batches, output=args.output, force=True)
    print("\n".join(result.manifest["summary"]))

    def accuracy(path: str) -> float:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        predicted = np.concatenate([session.run(None, {name: images[i:i + 8]})[0].argmax(-1)
                                    for i in range(0, len(images), 8)])
        return float((predicted == labels).mean())

    print(f"held-out accuracy on {len(labels)} lines: FP32 {accuracy(str(source)):.3f}, "
          f"{args.passes} {accuracy(f'{args.output}/model.onnx'):.3f}")


if __name__ == "__main__":
    main()
