"""Per-block FP8 quantization of weights (DeepSeek-V3: 128 x 128 tiles)."""

from __future__ import annotations

import torch

from r1kernels._ops import Sample, define_op
from r1kernels.fp8.tiles import quantize_outputs, quantize_tiles, validate_quantize_input

_OP = "quantize_fp8_per_block"
MAX_BLOCK = 128


def _fake(w: torch.Tensor, block_size: int, ue8m0: bool):
    validate_quantize_input("w", w, block_size, "block_size", MAX_BLOCK)
    return quantize_outputs(w, block_size, block_size, False)


def _samples(device: str):
    yield Sample((torch.randn(130, 300, device=device), 128, False))
    yield Sample((torch.randn(70, 90, device=device).to(torch.bfloat16), 64, True))


@define_op(_OP, fake=_fake, samples=_samples)
def _quantize_per_block_op(w: torch.Tensor, block_size: int, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    validate_quantize_input("w", w, block_size, "block_size", MAX_BLOCK)
    return quantize_tiles(w, block_size, block_size, ue8m0, False, op=_OP)


def quantize_per_block(
    w: torch.Tensor, block_size: int = 128, *, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` to FP8 E4M3 with one scale per ``block_size x block_size`` block.

    Args:
        w: ``[N, K]`` bfloat16 / float16 / float32 (a weight in ``out_features x in_features`` layout),
            unit stride in the last dim. N and K need not be multiples of the block: edge blocks are partial.
        block_size: a power of two in [16, 128] (one block is one program's register tile); 128 is
            DeepSeek-V3's.
        ue8m0: round each scale up to a power of two.

    Returns:
        ``(w_fp8 [N, K] float8_e4m3fn row-major, scales [ceil(N/block), ceil(K/block)] float32 row-major)``,
        the layout of DeepGEMM's ``sfb``. Non-finite inputs behave as in ``quantize_per_token_group``,
        per block.
    """
    return _quantize_per_block_op(w, block_size, ue8m0)
