"""qcompiler: quantization as compilation.

    model = qcompiler.load("model.onnx" | nn.Module | "hf_folder" | "minilm")
    result = qcompiler.compile(model, passes="normalize", calib="texts.txt", output="out/")
"""

from qcompiler.capture import load
from qcompiler.compiler import CompileResult, compile
from qcompiler.errors import QCompilerError
from qcompiler.pipeline import parse_pipeline
from qcompiler.pass_api import Pass, PassContext, PassOutcome
from qcompiler.registry import register

__all__ = ["CompileResult", "Pass", "PassContext", "PassOutcome", "QCompilerError", "compile", "load", "parse_pipeline", "register"]
__version__ = "0.1.0"
