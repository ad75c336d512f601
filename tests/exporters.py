"""Hugging Face optimum's ONNX export of a local folder, run in an interpreter of its own.

The exporter matrix writes the same weights three ways: the legacy TorchScript exporter
(`qcompiler.testing.export_legacy_causal_lm`, `export_legacy_minilm`), the dynamo exporter
qcompiler captures with (`qcompiler.capture`), and optimum, through this module.

optimum-onnx (every release up to 0.1.0) requires ``transformers<4.58`` while qcompiler
runs on transformers 5, so it cannot live in qcompiler's environment. It runs in the
interpreter that ``QCOMPILER_OPTIMUM_PYTHON`` names (this one by default), with this file
as its script: run that way, the file imports nothing but optimum, so that interpreter
needs neither qcompiler nor its pins.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

OPTIMUM_PYTHON_VARIABLE = "QCOMPILER_OPTIMUM_PYTHON"
def optimum_python() -> str | None:
    """The interpreter that has optimum's ONNX exporter, or None where there is none to run.

    ``QCOMPILER_OPTIMUM_PYTHON`` names it (a virtual environment set up beside qcompiler's
    for optimum's pins); otherwise this interpreter, if optimum is installed here.
    """
    python = os.environ.get(OPTIMUM_PYTHON_VARIABLE, sys.executable)
    probe = subprocess.run([python, "-c", "import optimum.exporters.onnx"], capture_output=True)
    return python if probe.returncode == 0 else None


def optimum(python: str, jobs: list[tuple[Path, Path, str]]) -> None:
    """Export each ``(folder, output folder, task)`` with optimum in ``python``, in one process (its import is slow).

    Each output folder gets optimum's ``model.onnx``. Nothing is downloaded: the folders are
    local and the hub is offline. A failed export raises with optimum's own message.
    """
    arguments = [str(part) for job in jobs for part in job]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([python, __file__, *arguments], capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        raise RuntimeError(f"optimum's export failed:\n{done.stderr[-3000:]}")


def _optimum_in_process(folder: str, output: str, task: str) -> None:
    """optimum's documented entry point on a local folder.

    Its own check of the file against PyTorch is left out for time: the matrix measures
    every compile against the exported file itself.
    """
    from optimum.exporters.onnx import main_export

    main_export(model_name_or_path=folder, output=output, task=task, do_validation=False)


if __name__ == "__main__":
    triples = sys.argv[1:]
    for start in range(0, len(triples), 3):
        _optimum_in_process(*triples[start:start + 3])
