"""Simulate backend: the quantize pass's QuantizeLinear/DequantizeLinear form, run by any ONNX runtime."""
