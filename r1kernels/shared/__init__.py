"""Pieces every op family's kernels share."""
