"""Triton kernels of the MLA family: the attention forward (``attention_fwd``) and its backward
(``attention_bwd``: the key / value gradients with per-head rope-key partials, and the query gradient)."""
