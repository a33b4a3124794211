"""Triton kernels of the FP8 family: tile-wise E4M3 quantization and dequantization.

A tile is TILE_M x TILE_K elements sharing one fp32 scale: 1 x 128 for DeepSeek-V3 activations
(per-token-group), 128 x 128 for weights (per-block). The scale rule is DeepSeek-V3's,
``scale = max(amax, 1e-4) / 448``, optionally rounded up to a power of two (UE8M0).

sm_80 has no FP8 conversion instruction (Triton rejects fp8e4nv there), so the kernels carry a
software encoder / decoder (HW_CVT=False) that rounds to nearest even like ``cvt.rn.satfinite``; it
mirrors ``csrc/common/e4m3.h`` bit for bit. sm_89+ uses the hardware conversion (HW_CVT=True).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1kernels.compile_registry import KernelVariant, register

E4M3_MAX = 448.0
MIN_AMAX = 1e-4


@triton.jit
def _e4m3_bits_software(v):
    """fp32 -> e4m3fn bit pattern (uint8), round to nearest even, saturating at 448, NaN -> NaN."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.minimum(tl.abs(v), 448.0)
    ab = a.to(tl.int32, bitcast=True)
    normal = ((ab + 0x7FFFF + ((ab >> 20) & 1)) >> 20) - 960  # RNE to 3 mantissa bits, rebias 127 -> 7
    # below 2^-6 the code is a / 2^-9 rounded to nearest even: adding and removing 2^23 does exactly that
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < 0.015625, sub, normal)
    code = tl.where(v != v, 0x7F, code)
    return (code | sign).to(tl.uint8)


@triton.jit
def _e4m3_value_software(q):
    """e4m3fn bit pattern (uint8) -> fp32, exact."""
    c = q.to(tl.int32)
    e = (c >> 3) & 0xF
    m = c & 0x7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    mag = tl.where((c & 0x7F) == 0x7F, float("nan"), mag)
    return tl.where((c & 0x80) != 0, -mag, mag)


@triton.jit
def _tile_scale(amax, has_nan, POW2: tl.constexpr):
    """DeepSeek-V3 scale from a tile's |x| max; NaN in the tile gives a NaN scale (propagates)."""
    s = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)
    if POW2:
        s_bits = s.to(tl.int32, bitcast=True)
        s = tl.where(s_bits >= 0x7F800000, s, ((s_bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True))
    return tl.where(has_nan, float("nan"), s)


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
        s = _tile_scale(amax, tl.max(tl.max(nan_flag, axis=1), axis=0) > 0, POW2)
        tl.store(s_ptr + pid_m * stride_si + pid_k * stride_sj, s)
        y = tl.math.div_rn(x, s)
    else:
        amax = tl.max(tl.abs(x), axis=1)
        s = _tile_scale(amax, tl.max(nan_flag, axis=1) > 0, POW2)
        tl.store(s_ptr + rows * stride_si + pid_k * stride_sj, s, mask=rows < M)
        y = tl.math.div_rn(x, s[:, None])

    q_offs = rows[:, None] * K + cols[None, :]
    if HW_CVT:
        tl.store(q_ptr + q_offs, y.to(tl.float8e4nv), mask=mask)
    else:
        tl.store(q_ptr + q_offs, _e4m3_bits_software(y), mask=mask)


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
    v = q.to(tl.float32) if HW_CVT else _e4m3_value_software(q)
    s = tl.load(s_ptr + (rows[:, None] // TILE_M) * stride_si + (cols[None, :] // TILE_K) * stride_sj, mask=mask)
    tl.store(out_ptr + offs, (v * s).to(out_ptr.dtype.element_ty), mask=mask)


# ---- launch configurations: pure functions of (shape, dtype, arch), shared with the compile registry


def hw_fp8_convert(arch: int | None) -> bool:
    """Hardware FP8 conversion exists from sm_89 on; the interpreter (arch None) emulates it."""
    return arch is None or arch >= 89


def quantize_config(tile_m: int, tile_k: int, rows_share_scale: bool) -> dict[str, int]:
    """Per-token-group: ~4096 elements per program (32 rows of 128); per-block: one 128 x 128 tile."""
    if rows_share_scale:
        return {"BLOCK_M": tile_m, "num_warps": 8 if tile_m * tile_k >= 8192 else 4}
    return {"BLOCK_M": max(1, min(256, 4096 // tile_k)), "num_warps": 4}


def dequantize_config(tile_m: int, tile_k: int) -> dict[str, int]:
    block_k = max(16, min(128, tile_k))
    return {"BLOCK_M": max(1, 4096 // block_k), "BLOCK_K": block_k, "num_warps": 4}


_TL_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@register("fp8")
def quantize_variants(arch: int) -> list[KernelVariant]:
    hw = hw_fp8_convert(arch)
    q_type = "*fp8e4nv" if hw else "*u8"
    out = []
    cases = [(dt, 1, 128, False, False) for dt in _TL_NAMES] + [
        (torch.bfloat16, 1, 128, False, True),  # UE8M0 scales
        (torch.bfloat16, 128, 128, True, False),  # per-block weights
        (torch.float32, 128, 128, True, True),
    ]
    for dtype, tile_m, tile_k, share, pow2 in cases:
        cfg = quantize_config(tile_m, tile_k, share)
        kind = "per_block" if share else "per_token_group"
        out.append(
            KernelVariant(
                name=f"fp8.quantize_{kind}[{_TL_NAMES[dtype]},{tile_m}x{tile_k}{',ue8m0' if pow2 else ''}]",
                kernel=quantize_tiles_kernel,
                signature={
                    "x_ptr": f"*{_TL_NAMES[dtype]}",
                    "q_ptr": q_type,
                    "s_ptr": "*fp32",
                    "M": "i32",
                    "K": "i32",
                    "stride_xm": "i32",
                    "stride_si": "i32",
                    "stride_sj": "i32",
                    "BLOCK_M": "constexpr",
                    "TILE_K": "constexpr",
                    "ROWS_SHARE_SCALE": "constexpr",
                    "POW2": "constexpr",
                    "HW_CVT": "constexpr",
                },
                constexprs={
                    "BLOCK_M": cfg["BLOCK_M"],
                    "TILE_K": tile_k,
                    "ROWS_SHARE_SCALE": share,
                    "POW2": pow2,
                    "HW_CVT": hw,
                },
                num_warps=cfg["num_warps"],
                aligned=("x_ptr", "q_ptr", "s_ptr", "K", "stride_xm"),
            )
        )
    return out


@register("fp8")
def dequantize_variants(arch: int) -> list[KernelVariant]:
    hw = hw_fp8_convert(arch)
    out = []
    for tile_m, out_dtype in ((1, torch.bfloat16), (128, torch.bfloat16), (128, torch.float32)):
        cfg = dequantize_config(tile_m, 128)
        out.append(
            KernelVariant(
                name=f"fp8.dequantize[{tile_m}x128->{_TL_NAMES[out_dtype]}]",
                kernel=dequantize_tiles_kernel,
                signature={
                    "q_ptr": "*fp8e4nv" if hw else "*u8",
                    "s_ptr": "*fp32",
                    "out_ptr": f"*{_TL_NAMES[out_dtype]}",
                    "M": "i32",
                    "K": "i32",
                    "stride_si": "i32",
                    "stride_sj": "i32",
                    "BLOCK_M": "constexpr",
                    "BLOCK_K": "constexpr",
                    "TILE_M": "constexpr",
                    "TILE_K": "constexpr",
                    "HW_CVT": "constexpr",
                },
                constexprs={
                    "BLOCK_M": cfg["BLOCK_M"],
                    "BLOCK_K": cfg["BLOCK_K"],
                    "TILE_M": tile_m,
                    "TILE_K": 128,
                    "HW_CVT": hw,
                },
                num_warps=cfg["num_warps"],
                aligned=("q_ptr", "s_ptr", "out_ptr", "K"),
            )
        )
    return out
