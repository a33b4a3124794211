"""Per-token-group FP8 quantization of activations (DeepSeek-V3: 1 x 128 tiles)."""

from __future__ import annotations

import torch

from r1kernels._ops import Sample, define_op
from r1kernels.fp8.tiles import SCALE_LAYOUTS, quantize_outputs, quantize_tiles, validate_quantize_input

_OP = "quantize_fp8_per_token_group"


def _fake(x: torch.Tensor, group_size: int, ue8m0: bool, m_major_scales: bool):
    validate_quantize_input("x", x, group_size, "group_size")
    return quantize_outputs(x, 1, group_size, m_major_scales)


def _samples(device: str):
    x = torch.randn(9, 300, device=device).to(torch.bfloat16)
    yield Sample((x, 128, False, False))
    yield Sample((x, 64, True, True))


@define_op(_OP, fake=_fake, samples=_samples)
def _quantize_per_token_group_op(
    x: torch.Tensor, group_size: int, ue8m0: bool, m_major_scales: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    validate_quantize_input("x", x, group_size, "group_size")
    return quantize_tiles(x, 1, group_size, ue8m0, m_major_scales, op=_OP)


def quantize_per_token_group(
    x: torch.Tensor, group_size: int = 128, *, ue8m0: bool = False, scale_layout: str = "row"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of ``x`` to FP8 E4M3 in groups of ``group_size`` columns.

    Args:
        x: ``[M, K]`` bfloat16 / float16 / float32, unit stride in the last dim (any row stride).
            K need not be a multiple of ``group_size``: the last group is partial.
        group_size: columns per scale, a power of two in [16, 1024]; 128 is DeepSeek-V3's.
        ue8m0: round each scale up to a power of two (the UE8M0 scales of DeepGEMM on SM100).
        scale_layout: ``"row"`` gives scales ``[M, G]`` row-major; ``"m_major"`` gives the same shape
            stored column-major with a column stride of M rounded up to 4 (16-byte aligned for TMA), the
            layout DeepGEMM's ``fp8_gemm_nt`` expects for ``sfa``.

    Returns:
        ``(x_fp8 [M, K] float8_e4m3fn row-major, scales [M, ceil(K / group_size)] float32)`` with
        ``x ~= x_fp8.float() * scales`` broadcast over each group and ``scale = max(amax, 1e-4) / 448``.

    Non-finite inputs: a NaN anywhere in a group makes that group's scale NaN and every value NaN; an
    Inf makes the scale Inf (its finite neighbours quantize to 0, the Inf to NaN), so the group
    dequantizes to NaN. Nothing is silently zeroed. An all-zero group gets scale 1e-4/448, never NaN.
    """
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}")
    return _quantize_per_token_group_op(x, group_size, ue8m0, scale_layout == "m_major")
