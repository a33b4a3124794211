"""Tile-wise E4M3 dequantization: codes times their tile's fp32 scale, to bf16 or fp32."""

from __future__ import annotations

import triton
import triton.language as tl

from r1kernels._launch import KernelConfig
from r1kernels.compile_registry import register, variant
from r1kernels.fp8.kernels.e4m3 import e4m3_value_software, hw_fp8_convert


@triton.jit
def dequantize_tiles_kernel(
    q_ptr,  # [M, K] float8_e4m3fn (HW_CVT) or uint8 view, dense row-major
    s_ptr,  # fp32 scales; tile (i, j) at s_ptr + i * stride_si + j * stride_sj
    out_ptr,  # [M, K] fp32 / bf16, dense row-major
    M,
    K,
    stride_si,
    stride_sj,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TILE_M: tl.constexpr,  # rows per scale (1 per-token-group, block size per-block)
    TILE_K: tl.constexpr,  # columns per scale
    HW_CVT: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    offs = rows[:, None] * K + cols[None, :]
    q = tl.load(q_ptr + offs, mask=mask)
    v = q.to(tl.float32) if HW_CVT else e4m3_value_software(q)
    s = tl.load(s_ptr + (rows[:, None] // TILE_M) * stride_si + (cols[None, :] // TILE_K) * stride_sj, mask=mask)
    tl.store(out_ptr + offs, (v * s).to(out_ptr.dtype.element_ty), mask=mask)


def config(tile_k: int) -> KernelConfig:
    block_k = max(16, min(128, tile_k))
    return KernelConfig({"BLOCK_M": max(1, 4096 // block_k), "BLOCK_K": block_k}, num_warps=4)


@register
def variants(arch: int):
    hw = hw_fp8_convert(arch)
    # DeepSeek's 1 x 128 and 128 x 128 tiles, and each smaller tile width (its own config: BLOCK_K = tile width)
    cases = [(1, 128, "bf16"), (128, 128, "bf16"), (128, 128, "fp32")] + [(1, k, "bf16") for k in (16, 32, 64)]
    return [
        variant(
            f"fp8.dequantize[{tile_m}x{tile_k}->{out_type}]", dequantize_tiles_kernel, config(tile_k),
            types={"q_ptr": "*fp8e4nv" if hw else "*u8", "s_ptr": "*fp32", "out_ptr": f"*{out_type}"},
            switches={"TILE_M": tile_m, "TILE_K": tile_k, "HW_CVT": hw},
            aligned=("q_ptr", "s_ptr", "out_ptr", "K"),
        )
        for tile_m, tile_k, out_type in cases
    ]  # fmt: skip
