"""Expert linear layers in FP8 (DeepSeek-V3's recipe for the routed experts): the forward, input-gradient and
weight-gradient products are ``r1kernels.fp8``'s grouped block-scaled GEMMs over the 128-aligned expert
segments.

    forward  y  = x @ W[e].T   grouped_gemm_nt_contiguous(x 1x128, W 128x128 per expert)
    dgrad    dx = dy @ W[e]    the same with each expert's codes transposed (a 128 x 128 block's scale serves
                               either way round: the weights are quantized once per call)
    wgrad    dW[e]             grouped_wgrad_gemm(dy.T and x.T quantized 128 x 1 along tokens, padding zeroed)
"""

from __future__ import annotations

import torch

from r1kernels._checks import check_tensor
from r1kernels.fp8.grouped_gemm_nt import SEGMENT, grouped_gemm_nt_contiguous
from r1kernels.fp8.grouped_wgrad_gemm import grouped_wgrad_gemm
from r1kernels.fp8.quantize_per_block import quantize_per_block
from r1kernels.fp8.quantize_per_token_group import quantize_per_token_group
from r1kernels.fp8.quantize_transposed import quantize_rowwise_and_transposed
from r1kernels.moe.permutation import PermutationIndex


def _quantize_experts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> (codes [E, N, K], scales [E, ceil(N/128), ceil(K/128)]); one launch when blocks cannot
    straddle two experts (N a multiple of 128), else one per expert."""
    E, N, K = weight.shape
    if N % SEGMENT == 0:
        codes, scales = quantize_per_block(weight.reshape(E * N, K))
        return codes.view(E, N, K), scales.view(E, N // SEGMENT, -1)
    pairs = [quantize_per_block(weight[e]) for e in range(E)]
    return torch.stack([c for c, _ in pairs]), torch.stack([s for _, s in pairs])


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32


class _FP8GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, row_expert):
        codes, scales = _quantize_experts(weight.detach())
        if weight.requires_grad:
            xq, xs, xtq, xts = quantize_rowwise_and_transposed(x, m_indices=row_expert)
        else:
            (xq, xs), xtq, xts = quantize_per_token_group(x), None, None
        y = grouped_gemm_nt_contiguous(xq, xs, codes, scales, row_expert, out_dtype=_gemm_dtype(x.dtype))
        ctx.save_for_backward(xtq, xts, codes, scales, row_expert)
        ctx.dtypes = (x.dtype, weight.dtype)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xtq, xts, codes, scales, row_expert = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[1]:
            dyq, dys, dytq, dyts = quantize_rowwise_and_transposed(dy, m_indices=row_expert)
            dw = grouped_wgrad_gemm(dytq, dyts, xtq, xts, row_expert, codes.shape[0]).to(w_dtype)
        elif ctx.needs_input_grad[0]:
            dyq, dys = quantize_per_token_group(dy)
        if ctx.needs_input_grad[0]:
            codes_t = codes.transpose(1, 2).contiguous()
            dx = grouped_gemm_nt_contiguous(dyq, dys, codes_t, scales.transpose(1, 2), row_expert,
                                            out_dtype=_gemm_dtype(x_dtype)).to(x_dtype)  # fmt: skip
        return dx, dw, None


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, index: PermutationIndex) -> torch.Tensor:
    """``grouped_linear`` with all three GEMMs in FP8 (see the module docstring).

    Args:
        x: ``[R, K]`` float32 / bfloat16 / float16 rows in ``index``'s layout; ``index`` built with ``align=128``
            (the FP8 grouped GEMMs' contiguous layout) on every device.
        weight: ``[E, N, K]`` the master weights (any of those dtypes); K and N multiples of 16.

    Returns ``[R, N]`` in x's dtype (0 on padding rows). Differentiable w.r.t. x and weight; padding rows never
    reach a weight gradient (they are zeroed when quantized).
    """
    check_tensor("x", x, dtypes=(torch.float32, torch.bfloat16, torch.float16), ndim=2, contiguous=True)
    check_tensor("weight", weight, dtypes=(torch.float32, torch.bfloat16, torch.float16), ndim=3)
    if x.shape[0] % SEGMENT:
        raise ValueError(f"x must have a multiple of {SEGMENT} rows: build the index with align={SEGMENT}")
    return _FP8GroupedLinear.apply(x, weight.contiguous(), index.row_expert)
