"""Triton kernels of the MoE family: row movement between token order and the expert-sorted layout
(``rows``: gathers, the weighted combination back to tokens, the routing-weight gradient) and the grouped
GEMM over expert segments (``grouped_gemm``)."""
