"""Tile-wise E4M3 quantization: one fp32 scale per TILE_M x TILE_K tile, 1 x 128 for DeepSeek-V3 activations
(per-token-group), 128 x 128 for weights (per-block)."""

from __future__ import annotations

import triton
import triton.language as tl

from r1kernels._launch import KernelConfig
from r1kernels.compile_registry import register, variant
from r1kernels.fp8.kernels.e4m3 import e4m3_bits_software, hw_fp8_convert, tile_scale


@triton.jit
def quantize_tiles_kernel(
    x_ptr,  # [M, K] bf16 / fp16 / fp32, row stride stride_xm, column stride 1
    q_ptr,  # [M, K] float8_e4m3fn (HW_CVT) or its uint8 view (software encoder), dense row-major
    s_ptr,  # fp32 scales; tile (i, j) at s_ptr + i * stride_si + j * stride_sj
    M,
    K,
    stride_xm,
    stride_si,
    stride_sj,
    BLOCK_M: tl.constexpr,  # rows per program (== TILE_M when ROWS_SHARE_SCALE)
    TILE_K: tl.constexpr,  # columns per scale
    ROWS_SHARE_SCALE: tl.constexpr,  # True: one scale for the BLOCK_M x TILE_K tile; False: one per row
    POW2: tl.constexpr,
    HW_CVT: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * TILE_K + tl.arange(0, TILE_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    # tl.max drops NaN on the GPU (maxnum) but not in the interpreter: track NaN explicitly so both agree.
    # Division is IEEE round-to-nearest (div_rn, not Triton's default approximate `/`) so that the
    # bytes equal the reference's and the C++ path's bit for bit.
    nan_flag = (x != x).to(tl.int32)
    if ROWS_SHARE_SCALE:
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        s = tile_scale(amax, tl.max(tl.max(nan_flag, axis=1), axis=0) > 0, POW2)
        tl.store(s_ptr + pid_m * stride_si + pid_k * stride_sj, s)
        y = tl.math.div_rn(x, s)
    else:
        amax = tl.max(tl.abs(x), axis=1)
        s = tile_scale(amax, tl.max(nan_flag, axis=1) > 0, POW2)
        tl.store(s_ptr + rows * stride_si + pid_k * stride_sj, s, mask=rows < M)
        y = tl.math.div_rn(x, s[:, None])

    q_offs = rows[:, None] * K + cols[None, :]
    if HW_CVT:
        tl.store(q_ptr + q_offs, y.to(tl.float8e4nv), mask=mask)
    else:
        tl.store(q_ptr + q_offs, e4m3_bits_software(y), mask=mask)


def config(tile_m: int, tile_k: int) -> KernelConfig:
    """Per-token-group (tile_m 1): ~4096 elements per program (32 rows of 128); per-block: one tile, with
    ~2048 elements per warp so that even a 16 x 16 tile gives each thread a 16-byte access."""
    if tile_m > 1:
        return KernelConfig({"BLOCK_M": tile_m}, num_warps=max(1, min(8, tile_m * tile_k // 2048)))
    return KernelConfig({"BLOCK_M": max(1, min(256, 4096 // tile_k))}, num_warps=4)


GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)  # per-token-group: columns per scale
BLOCK_SIZES = (16, 32, 64, 128)  # per-block: a block is one program's tile, so it stays register-sized


@register
def variants(arch: int):
    hw = hw_fp8_convert(arch)
    out = []
    # (input type, tile rows, tile columns, UE8M0): every dtype at DeepSeek's 1 x 128, every tile size the
    # launchers accept (each has its own config) in bf16
    cases = [(dt, 1, 128, False) for dt in ("fp32", "fp16", "bf16")] + [
        ("bf16", 1, 128, True),
        ("fp32", 128, 128, True),
    ]
    cases += [("bf16", 1, g, False) for g in GROUP_SIZES if g != 128] + [("bf16", b, b, False) for b in BLOCK_SIZES]
    for dtype, tile_m, tile_k, pow2 in cases:
        kind = "per_block" if tile_m > 1 else "per_token_group"
        out.append(variant(
            f"fp8.quantize_{kind}[{dtype},{tile_m}x{tile_k}{',ue8m0' if pow2 else ''}]", quantize_tiles_kernel,
            config(tile_m, tile_k),
            types={"x_ptr": f"*{dtype}", "q_ptr": "*fp8e4nv" if hw else "*u8", "s_ptr": "*fp32"},
            switches={"TILE_K": tile_k, "ROWS_SHARE_SCALE": tile_m > 1, "POW2": pow2, "HW_CVT": hw},
            aligned=("x_ptr", "q_ptr", "s_ptr", "K", "stride_xm"),
        ))  # fmt: skip
    return out
