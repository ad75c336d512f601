"""qcompiler: quantization as compilation.

    model = qcompiler.load("model.onnx" | nn.Module | "hf_folder" | "minilm")
    result = qcompiler.compile(model, passes="normalize", calib="texts.txt", output="out/")
    found = qcompiler.search(model, "cos>=0.998", backend="ort", output="out/")   # the compiler picks the passes
"""

from qcompiler.capture import load
from qcompiler.compiler import CompileResult, compile
from qcompiler.errors import QCompilerError
from qcompiler.pipeline import parse_pipeline
from qcompiler.pass_api import Pass, PassContext, PassOutcome
from qcompiler.recipe_search import SearchResult, TargetNotMet, search
from qcompiler.registry import register

__all__ = ["CompileResult", "Pass", "PassContext", "PassOutcome", "QCompilerError", "SearchResult", "TargetNotMet", "compile",
           "load", "parse_pipeline", "register", "search"]
__version__ = "0.1.0"
