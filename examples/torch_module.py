"""A PyTorch module through qcompiler: capture with dynamic batch and sequence, quantize, run at other shapes.

    .venv/bin/python examples/torch_module.py [-o out/module]

``qcompiler.compile(module, ..., example_inputs=...)`` captures the module with the
official dynamo exporter; its batch and sequence axes stay dynamic, so calibration
batches and the deployed model take other shapes than the example's. The weights here are
random: this shows the path, not an accuracy figure.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
import torch

import qcompiler


class TinyEncoder(torch.nn.Module):
    """Token embedding, one pre-norm MLP block with a residual, and a classifier head."""

    def __init__(self, vocab: int = 500, hidden: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.up = torch.nn.Linear(hidden, 4 * hidden)
        self.down = torch.nn.Linear(4 * hidden, hidden)
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return self.head(x.mean(dim=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="out/module")
    args = parser.parse_args()

    torch.manual_seed(0)
    module = TinyEncoder().eval()
    rng = np.random.default_rng(0)
    calibration = [{"ids": rng.integers(0, 500, (8, 32)).astype(np.int64)} for _ in range(12)]
    result = qcompiler.compile(module, "smooth,w8a8", example_inputs=(torch.zeros(1, 16, dtype=torch.long),),
                               calib=calibration, output=args.output, force=True)
    print("\n".join(result.manifest["summary"]))
    print("inputs:", result.manifest["inputs"])

    session = ort.InferenceSession(f"{args.output}/model.onnx", providers=["CPUExecutionProvider"])
    for batch, length in ((1, 7), (3, 40)):  # neither the example's shape nor the calibration's
        ids = rng.integers(0, 500, (batch, length)).astype(np.int64)
        with torch.no_grad():
            expected = module(torch.from_numpy(ids)).numpy()
        got = session.run(None, {"ids": ids})[0]
        cosine = float((got * expected).sum() / np.linalg.norm(got) / np.linalg.norm(expected))
        print(f"batch {batch} x {length} tokens: output {list(got.shape)}, cosine to the float module {cosine:.4f}")


if __name__ == "__main__":
    main()
