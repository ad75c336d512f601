"""Lowerings from the annotated IR to runtimes (ONNX Runtime, TVM) live here, one package each."""
