"""Triton kernels of the GRPO family, one module per kernel: the LM-head log-prob forward, the d-logits
recompute of its backward, and the matmul that turns d logits into d hidden and d weight. ``logits_tile``
holds the pieces they share (the logits tile recompute, the dot precision policy, the dtype cases)."""
