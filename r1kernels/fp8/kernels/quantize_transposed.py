"""Transpose-and-quantize in one pass: x [T, C] -> x.T [C, T] in E4M3 with one scale per 128 tokens of each
column (the 128 x 1 tiles of the weight-gradient GEMM's operands) and, with ROWWISE, also x [T, C] in 1 x 128
groups (the forward / data-gradient GEMM's operand), from one read of x."""

from __future__ import annotations

import triton
import triton.language as tl

from r1kernels._launch import KernelConfig
from r1kernels.compile_registry import register, variant
from r1kernels.fp8.kernels.e4m3 import e4m3_bits_software, hw_fp8_convert, tile_scale

TILE = 128  # tokens per transposed scale and columns per row-wise scale: one program's tile is TILE x TILE


@triton.jit
def _encode(y, HW_CVT: tl.constexpr):
    if HW_CVT:
        codes = y.to(tl.float8e4nv)
    else:
        codes = e4m3_bits_software(y)
    return codes


@triton.jit
def quantize_transposed_kernel(
    x_ptr,  # [T, C] bf16 / fp16 / fp32, row stride stride_x, unit column stride
    qt_ptr,  # [C, T_pad] codes of x.T, dense; tokens T..T_pad (padding to 16) are written as 0
    st_ptr,  # [C, ceil(T/128)] fp32 row-major: scale of x[128 j : 128 j + 128, c]
    q_ptr,  # ROWWISE: [T, C] codes of x, dense row-major
    s_ptr,  # ROWWISE: [T, ceil(C/128)] fp32, strides (stride_sm, stride_sk)
    ids_ptr,  # HAS_IDS: [T] int32; rows with a negative id (MoE padding) quantize as zeros
    T, C, T_pad, stride_x, stride_sm, stride_sk,
    ROWWISE: tl.constexpr, HAS_IDS: tl.constexpr, POW2: tl.constexpr, HW_CVT: tl.constexpr,
    TILE_T: tl.constexpr, TILE_C: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    rows = pid_t * TILE_T + tl.arange(0, TILE_T)
    cols = pid_c * TILE_C + tl.arange(0, TILE_C)
    mask = (rows[:, None] < T) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_IDS:  # padding rows may hold anything (uninitialised memory): they must not reach a scale or a sum
        ids = tl.load(ids_ptr + rows, mask=rows < T, other=-1)
        x = tl.where(ids[:, None] >= 0, x, 0.0)
    nan = (x != x).to(tl.int32)  # explicit NaN tracking, as in quantize_tiles (tl.max drops NaN on the GPU)

    s_col = tile_scale(tl.max(tl.abs(x), axis=0), tl.max(nan, axis=0) > 0, POW2)
    tl.store(st_ptr + cols * tl.cdiv(T, TILE_T) + pid_t, s_col, mask=cols < C)
    yt = tl.trans(tl.math.div_rn(x, s_col[None, :]))  # [TILE_C, TILE_T]: the store runs along tokens
    t_mask = (cols[:, None] < C) & (rows[None, :] < T_pad)
    tl.store(qt_ptr + cols[:, None] * T_pad + rows[None, :], _encode(yt, HW_CVT), mask=t_mask)

    if ROWWISE:
        s_row = tile_scale(tl.max(tl.abs(x), axis=1), tl.max(nan, axis=1) > 0, POW2)
        tl.store(s_ptr + rows * stride_sm + pid_c * stride_sk, s_row, mask=rows < T)
        y = tl.math.div_rn(x, s_row[:, None])
        tl.store(q_ptr + rows[:, None] * C + cols[None, :], _encode(y, HW_CVT), mask=mask)


def config() -> KernelConfig:
    """One 128 x 128 tile per program (both scale groupings need all 128 of their elements): 8 warps, 64
    elements per thread."""
    return KernelConfig({"TILE_T": TILE, "TILE_C": TILE}, num_warps=8)


@register
def variants(arch: int):
    hw = hw_fp8_convert(arch)
    codes = "*fp8e4nv" if hw else "*u8"
    out = []
    for dtype, rowwise, has_ids in (("bf16", True, False), ("bf16", False, False), ("fp32", True, False),
                                    ("fp16", True, False), ("bf16", False, True)):  # fmt: skip
        tag = f"{dtype}{',rowwise' if rowwise else ''}{',ids' if has_ids else ''}"
        out.append(variant(
            f"fp8.quantize_transposed[{tag}]", quantize_transposed_kernel, config(),
            types={"x_ptr": f"*{dtype}", "qt_ptr": codes, "st_ptr": "*fp32", "q_ptr": codes, "s_ptr": "*fp32",
                   "ids_ptr": "*i32"},
            switches={"ROWWISE": rowwise, "HAS_IDS": has_ids, "POW2": False, "HW_CVT": hw},
            aligned=("x_ptr", "qt_ptr", "q_ptr", "C", "stride_x", "T_pad"),
        ))  # fmt: skip
    return out
