"""Triton helpers shared across families (no kernels of their own)."""
