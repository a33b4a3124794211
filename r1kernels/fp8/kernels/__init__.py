"""Triton kernels of the FP8 family, one module per kernel (``quantize_tiles``, ``dequantize_tiles``) and the
E4M3 encoding they share (``e4m3``)."""
