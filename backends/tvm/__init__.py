"""TVM backend: generated CPU/GPU kernels for quantized linears."""
