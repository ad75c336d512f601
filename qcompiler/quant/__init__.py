"""Quantization: formats, specs, presets, weight quantizers, observers, and the simulate form."""
