"""Quantization arithmetic: fake quantization for searches, later formats and quantizers."""
