"""Plain PyTorch FP8 E4M3 quantization: the truth the kernels are tested against.

Computed in float32 from the same inputs; the kernels must match these bytes and scales exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0
MIN_AMAX = 1e-4


def scale_from_amax(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    """DeepSeek-V3: scale = max(amax, 1e-4) / 448; UE8M0 rounds it up to a power of two. NaN stays NaN."""
    scale = torch.clamp_min(amax, MIN_AMAX) / E4M3_MAX
    if ue8m0:
        mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
        up = torch.ldexp(torch.ones_like(scale), torch.where(mantissa == 0.5, exponent - 1, exponent))
        scale = torch.where(torch.isfinite(scale), up, scale)
    return scale


def to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """Round to nearest even, saturating finite values at +-448 like the GPU's cvt.rn.satfinite."""
    return torch.where(y.isnan(), y, y.clamp(-E4M3_MAX, E4M3_MAX)).to(torch.float8_e4m3fn)


def quantize_tiles(x: torch.Tensor, tile_m: int, tile_k: int, ue8m0: bool = False):
    """x [M, K] -> (q [M, K] e4m3, scales [ceil(M/tile_m), ceil(K/tile_k)] fp32); partial edge tiles
    take their amax over the elements that exist."""
    M, K = x.shape
    tm, tk = -(-M // tile_m), -(-K // tile_k)
    xf = F.pad(x.float(), (0, tk * tile_k - K, 0, tm * tile_m - M))
    tiles = xf.view(tm, tile_m, tk, tile_k)
    amax = tiles.abs().amax(dim=(1, 3))  # amax propagates NaN
    scale = scale_from_amax(amax, ue8m0)
    q = to_e4m3(tiles / scale[:, None, :, None]).view(tm * tile_m, tk * tile_k)[:M, :K]
    return q.contiguous(), scale


def quantize_per_token_group(x: torch.Tensor, group_size: int = 128, ue8m0: bool = False):
    return quantize_tiles(x, 1, group_size, ue8m0)


def quantize_per_block(w: torch.Tensor, block_size: int = 128, ue8m0: bool = False):
    return quantize_tiles(w, block_size, block_size, ue8m0)


def dequantize_tiles(q: torch.Tensor, scales: torch.Tensor, tile_m: int, tile_k: int) -> torch.Tensor:
    """q [M, K] e4m3, scales per tile -> float32 [M, K]."""
    M, K = q.shape
    full = scales.float().repeat_interleave(tile_m, 0)[:M].repeat_interleave(tile_k, 1)[:, :K]
    return q.float() * full


def gemm_nt(a, a_scales, b, b_scales, c=None) -> torch.Tensor:
    """D = dequant(a) @ dequant(b).T (+ c) in float64: a [M, K] e4m3 with [M, ceil(K/128)] scales, b [N, K]
    e4m3 with [ceil(N/128), ceil(K/128)] scales."""
    d = dequantize_tiles(a, a_scales, 1, 128).double() @ dequantize_tiles(b, b_scales, 128, 128).double().T
    return d if c is None else d + c.double()


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's accuracy metric, 1 - 2<x, y> / (<x, x> + <y, y>): 0 for equal tensors."""
    x, y = x.detach().double(), y.detach().double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def grouped_gemm_nt_contiguous(a, a_scales, b, b_scales, m_indices) -> torch.Tensor:
    """Row r of the output is dequant(a[r]) @ dequant(b[m_indices[r]]).T in float64; zeros where m_indices is -1."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    a64 = dequantize_tiles(a, a_scales, 1, 128).double()
    for r, e in enumerate(m_indices.tolist()):
        if e >= 0:
            out[r] = a64[r] @ dequantize_tiles(b[e], b_scales[e], 128, 128).double().T
    return out


def grouped_gemm_nt_masked(a, a_scales, b, b_scales, masked_m) -> torch.Tensor:
    """out[g, :masked_m[g]] = dequant(a[g]) @ dequant(b[g]).T in float64 for those rows; the rest 0."""
    G, M, _ = a.shape
    out = torch.zeros(G, M, b.shape[1], dtype=torch.float64)
    for g, m in enumerate(masked_m.tolist()):
        out[g, :m] = gemm_nt(a[g, :m], a_scales[g, :m], b[g], b_scales[g])
    return out


def quantize_transposed(x: torch.Tensor, m_indices: torch.Tensor | None = None):
    """x [T, C] -> (x.T codes [C, T_pad], scales [C, ceil(T/128)]): 1 x 128 groups along tokens of x.T with its
    rows zero-padded to T_pad = T rounded up to 16; rows of x with a negative id count as zeros."""
    if m_indices is not None:
        x = torch.where((m_indices >= 0)[:, None], x.float(), 0.0)
    T = x.shape[0]
    return quantize_per_token_group(F.pad(x.float().T, (0, -T % 16)))


def wgrad_gemm(a, a_scales, b, b_scales) -> torch.Tensor:
    """dW = dequant(a) @ dequant(b).T in float64, both operands with 1 x 128 scales (along tokens)."""
    return dequantize_tiles(a, a_scales, 1, 128).double() @ dequantize_tiles(b, b_scales, 1, 128).double().T


def quantize_dequantize(x: torch.Tensor, tile_m: int, tile_k: int) -> torch.Tensor:
    """x rounded through e4m3 on ``tile_m x tile_k`` tiles, back in float64: what an FP8 GEMM operand holds."""
    q, scales = quantize_tiles(x.reshape(-1, x.shape[-1]), tile_m, tile_k)
    return dequantize_tiles(q, scales, tile_m, tile_k).double().view(x.shape)


class _FP8Linear(torch.autograd.Function):
    """DeepSeek-V3's FP8 training recipe in float64 on the same tiles as ``r1kernels.fp8.fp8_linear``: forward
    x 1 x 128 and W 128 x 128; input gradient dy 1 x 128 against the same W; weight gradient dy.T and x.T in
    128 x 1 tiles along the tokens. Only the accumulation order differs from the kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        w = quantize_dequantize(weight.detach(), 128, 128)
        ctx.save_for_backward(x, w)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        y = quantize_dequantize(x, 1, 128) @ w.T
        return y if bias is None else y + bias.double()

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = dw = db = None
        if need_x:
            dx = (quantize_dequantize(dy, 1, 128) @ w).to(ctx.dtypes[0])
        if need_w:
            dw = (quantize_dequantize(dy, 128, 1).T @ quantize_dequantize(x, 128, 1)).to(ctx.dtypes[1])
        if need_b:
            db = dy.sum(0).to(ctx.dtypes[2])
        return dx, dw, db


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ weight [N, K].T (+ bias)`` in float64 through FP8 operands (see ``_FP8Linear``); any leading
    shape of x; differentiable."""
    y = _FP8Linear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])
