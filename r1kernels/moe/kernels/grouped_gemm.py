"""Grouped GEMM over MoE expert segments (bf16 / fp16 / fp32 operands, fp32 accumulation), the three products
of an expert linear layer in one kernel with general strides:

    forward  Y[r] = X[r] @ W[e].T      rows in 128-aligned expert segments, e from the row tile's ids
    dgrad    dX[r] = dY[r] @ W[e]      the same, W read transposed through its strides
    wgrad    dW[e] = dY_e.T @ X_e      K_GROUPED: expert e reduces over its own rows [start, start + count)

Row-grouped launches are persistent (programs walk (tile) work items, padding tiles cost a few instructions);
the weight gradient is one (expert, tile) item per program.
"""

from __future__ import annotations

import triton
import triton.language as tl

from r1kernels._launch import KernelConfig
from r1kernels.compile_registry import register, variant
from r1kernels.shared.kernels.program_order import grouped_tile

SEGMENT = 128  # row-grouped launches need expert segments aligned to this (a row tile never spans experts)


@triton.jit
def grouped_gemm_kernel(
    a_ptr,  # A [M, K] with strides (stride_am, stride_ak): X, dY, or (K_GROUPED) dY.T over all rows
    b_ptr,  # B[e] [N, K] with strides (stride_bn, stride_bk), expert e at b_ptr + e * stride_be
    c_ptr,  # C [M, N] (row-grouped) or C[e] [M, N] at c_ptr + e * stride_ce (K_GROUPED); row stride stride_cm
    ids_ptr,  # row-grouped: [M] int32 expert of each row, -1 on padding (its output row is 0);
    # K_GROUPED: [E] int64 segment starts and counts_ptr [E] int32 rows of each expert (the reduction range)
    counts_ptr,
    M, N, K, E, stride_am, stride_ak, stride_bn, stride_bk, stride_be, stride_cm, stride_ce,
    K_GROUPED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tiles_m * tiles_n
    if K_GROUPED:  # one (expert, tile) item per program: every item has real work
        first, last, step = tl.program_id(0), tl.program_id(0) + 1, 1
    else:  # persistent over row tiles
        first, last, step = tl.program_id(0), tiles, tl.num_programs(0)
    for work in tl.range(first, last, step):
        pid_m, pid_n = grouped_tile(work % tiles, tiles_m, tiles_n, GROUP_M)
        rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        c_tile = c_ptr
        if K_GROUPED:
            expert = (work // tiles).to(tl.int64)
            k_begin = tl.load(ids_ptr + expert)
            k_end = k_begin + tl.load(counts_ptr + expert)
            b_tile = b_ptr
            c_tile += expert * stride_ce
        else:
            row_ids = tl.load(ids_ptr + rm, mask=rm < M, other=-1)
            expert = tl.max(row_ids, axis=0)
            k_begin = 0
            k_end = tl.where(expert >= 0, K, 0)  # an all-padding tile skips its K loop
            b_tile = b_ptr + tl.maximum(expert, 0).to(tl.int64) * stride_be
        kk = (k_begin + rk).to(tl.int64)[None, :]  # 64-bit: a K offset times a row stride can pass 2**31
        a_ptrs = a_ptr + rm[:, None] * stride_am + kk * stride_ak
        b_ptrs = b_tile + rn[:, None] * stride_bn + kk * stride_bk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(k_begin, k_end, BLOCK_K):
            k_mask = rk[None, :] < k_end - k0
            a = tl.load(a_ptrs, mask=(rm[:, None] < M) & k_mask, other=0.0)
            b = tl.load(b_ptrs, mask=(rn[:, None] < N) & k_mask, other=0.0)
            acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        if not K_GROUPED:
            acc = tl.where(row_ids[:, None] >= 0, acc, 0.0)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(c_tile + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


def precision(dtype_bytes: int) -> str:
    """fp32 operands multiply in full fp32 (FMA, like torch's default for fp32 matmul), not TF32."""
    return "ieee" if dtype_bytes == 4 else "tf32"


def config(dtype_bytes: int) -> KernelConfig:
    """16-bit: 128 x 128 x 64 tiles over 8 warps (two warpgroups on sm_90a), 3 stages (96 KB). fp32 (FMA dots
    hold both operand tiles in registers): 64 x 64 x 16 over 8 warps."""
    if dtype_bytes == 4:
        return KernelConfig({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=8, num_stages=3)
    return KernelConfig({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3)


@register
def variants(arch: int):
    out = []
    # (dtype, product, contiguous K operand): forward (A and B both K-contiguous), dgrad (B's K = W's rows),
    # wgrad (A = dY.T and B = X.T: both read along rows)
    for dtype in ("bf16", "fp16", "fp32"):
        for product in ("forward", "dgrad", "wgrad"):
            k_grouped = product == "wgrad"
            unit = {"forward": ("stride_ak", "stride_bk"), "dgrad": ("stride_ak", "stride_bn"),
                    "wgrad": ("stride_am", "stride_bn")}[product]  # fmt: skip
            out_type = "fp32" if k_grouped else dtype
            strides = ("stride_am", "stride_ak", "stride_bn", "stride_bk")  # the non-unit ones: 16-element rows
            out.append(variant(
                f"moe.grouped_gemm[{dtype},{product}]", grouped_gemm_kernel, config(4 if dtype == "fp32" else 2),
                kind="matrix" if dtype != "fp32" else "fma",
                types={"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": f"*{out_type}",
                       "ids_ptr": "*i64" if k_grouped else "*i32", "counts_ptr": "*i32"},
                switches={"K_GROUPED": k_grouped, "PRECISION": precision(4 if dtype == "fp32" else 2)}, unit=unit,
                aligned=("a_ptr", "b_ptr", "c_ptr", "K", "N", "stride_cm", "stride_be", "stride_ce",
                         *(s for s in strides if s not in unit)),
            ))  # fmt: skip
    return out
