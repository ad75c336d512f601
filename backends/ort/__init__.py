"""ONNX Runtime backend: the quantized IR lowered to onnxruntime's integer kernels."""
