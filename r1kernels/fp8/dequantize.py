"""Dequantization of per-token-group and per-block FP8 tensors back to bf16 / fp32."""

from __future__ import annotations

import torch

from r1kernels._ops import Sample, define_op
from r1kernels.fp8.tiles import dequantize_tiles, validate_dequantize_input

# torch's schema check compares inputs before / after with allclose, which has no float8 kernel; the other
# checks (fake tensor, aot dispatch, autograd registration) run on these FP8-input ops.
_FP8_INPUT_CHECKS = ("test_faketensor", "test_aot_dispatch_dynamic", "test_autograd_registration")


def _codes(rows: int, cols: int, device: str) -> torch.Tensor:
    return (torch.randn(rows, cols, device=device) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)


def _fake_group(x_fp8: torch.Tensor, scales: torch.Tensor, group_size: int, out_dtype: torch.dtype):
    validate_dequantize_input(x_fp8, scales, 1, group_size, "group_size", out_dtype)
    return torch.empty(x_fp8.shape, dtype=out_dtype, device=x_fp8.device)


def _group_samples(device: str):
    scales = torch.rand(9, 3, device=device) + 0.1
    yield Sample((_codes(9, 300, device), scales, 128, torch.bfloat16), _FP8_INPUT_CHECKS)
    yield Sample((_codes(9, 300, device), scales.t().contiguous().t(), 128, torch.float32), _FP8_INPUT_CHECKS)


@define_op("dequantize_fp8_per_token_group", fake=_fake_group, samples=_group_samples)
def _dequantize_per_token_group_op(
    x_fp8: torch.Tensor, scales: torch.Tensor, group_size: int, out_dtype: torch.dtype
) -> torch.Tensor:
    validate_dequantize_input(x_fp8, scales, 1, group_size, "group_size", out_dtype)
    return dequantize_tiles(x_fp8, scales, 1, group_size, out_dtype, op="dequantize_fp8_per_token_group")


def _fake_block(w_fp8: torch.Tensor, scales: torch.Tensor, block_size: int, out_dtype: torch.dtype):
    validate_dequantize_input(w_fp8, scales, block_size, block_size, "block_size", out_dtype)
    return torch.empty(w_fp8.shape, dtype=out_dtype, device=w_fp8.device)


def _block_samples(device: str):
    yield Sample((_codes(130, 300, device), torch.rand(2, 3, device=device), 128, torch.float32), _FP8_INPUT_CHECKS)


@define_op("dequantize_fp8_per_block", fake=_fake_block, samples=_block_samples)
def _dequantize_per_block_op(
    w_fp8: torch.Tensor, scales: torch.Tensor, block_size: int, out_dtype: torch.dtype
) -> torch.Tensor:
    validate_dequantize_input(w_fp8, scales, block_size, block_size, "block_size", out_dtype)
    return dequantize_tiles(w_fp8, scales, block_size, block_size, out_dtype, op="dequantize_fp8_per_block")


def dequantize_per_token_group(
    x_fp8: torch.Tensor, scales: torch.Tensor, group_size: int = 128, *, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``x_fp8 [M, K] float8_e4m3fn`` (contiguous) times ``scales [M, ceil(K/group_size)] float32`` (any
    strides, so M-major scales work) broadcast over each group -> ``[M, K]`` in ``out_dtype``
    (bfloat16 or float32). The product is formed in fp32 and rounded once to ``out_dtype``."""
    return _dequantize_per_token_group_op(x_fp8, scales, group_size, out_dtype)


def dequantize_per_block(
    w_fp8: torch.Tensor, scales: torch.Tensor, block_size: int = 128, *, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``w_fp8 [N, K] float8_e4m3fn`` (contiguous) times ``scales [ceil(N/b), ceil(K/b)] float32``
    broadcast over each ``b x b`` block -> ``[N, K]`` in ``out_dtype`` (bfloat16 or float32)."""
    return _dequantize_per_block_op(w_fp8, scales, block_size, out_dtype)
