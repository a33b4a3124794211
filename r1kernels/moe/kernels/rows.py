"""Row movement between token order and the expert-sorted layout (MoE permute / unpermute and their
gradients). All gathers: every output element is written by one program from a fixed order of reads, so
results are deterministic (no atomics), with fp32 accumulation where rows are summed."""

from __future__ import annotations

import triton
import triton.language as tl

from r1kernels._launch import KernelConfig
from r1kernels.compile_registry import register, variant


@triton.jit
def gather_rows_kernel(
    x_ptr,  # [T, H] token rows, row stride stride_x
    slot_ptr,  # [R] int32: output row r copies token slot_ptr[r] // top_k; -1 writes a zero row (padding)
    w_ptr,  # HAS_WEIGHT: [T * top_k] fp32, row r is scaled by w[slot_ptr[r]]
    out_ptr,  # [R, H], row stride stride_out
    R, H, top_k, stride_x, stride_out,
    HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    slot = tl.load(slot_ptr + rows, mask=rows < R, other=-1).to(tl.int64)
    valid = slot >= 0
    token = slot // top_k
    in_cols = cols[None, :] < H
    v = tl.load(x_ptr + token[:, None] * stride_x + cols[None, :], mask=valid[:, None] & in_cols, other=0.0)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + slot, mask=valid, other=0.0)
        v = (v.to(tl.float32) * w[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], v, mask=(rows[:, None] < R) & in_cols)


@triton.jit
def combine_rows_kernel(
    y_ptr,  # [R, H] expert-sorted rows, row stride stride_y
    row_ptr,  # [T, top_k] int32 row of each slot, -1: not routed (contributes nothing)
    w_ptr,  # HAS_WEIGHT: [T, top_k] fp32 routing weights
    out_ptr,  # [T, H]: out[t] = sum_j w[t, j] * y[row[t, j]], summed in fp32 in slot order
    T, H, top_k, stride_y, stride_out,
    HAS_WEIGHT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_cols = cols[None, :] < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in range(0, top_k):
        row = tl.load(row_ptr + tokens * top_k + j, mask=tokens < T, other=-1).to(tl.int64)
        valid = row >= 0
        v = tl.load(y_ptr + row[:, None] * stride_y + cols[None, :], mask=valid[:, None] & in_cols, other=0.0)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + tokens * top_k + j, mask=valid, other=0.0)
            acc += v.to(tl.float32) * w[:, None]
        else:
            acc += v.to(tl.float32)
    tl.store(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(tokens[:, None] < T) & in_cols)  # fmt: skip


@triton.jit
def row_dot_kernel(
    d_ptr,  # [T, H] the gradient of the combined output, row stride stride_d
    y_ptr,  # [R, H] the expert rows that were combined, row stride stride_y
    row_ptr,  # [T, top_k] int32 row of each slot (-1: not routed, gradient 0)
    out_ptr,  # [T, top_k] fp32: <d[t], y[row[t, j]]>, the routing weights' gradient
    T, H, top_k, stride_d, stride_y,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    for j in range(0, top_k):
        row = tl.load(row_ptr + tokens * top_k + j, mask=tokens < T, other=-1).to(tl.int64)
        valid = row >= 0
        acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            m = valid[:, None] & (cols[None, :] < H)
            d = tl.load(d_ptr + tokens[:, None] * stride_d + cols[None, :], mask=m, other=0.0).to(tl.float32)
            v = tl.load(y_ptr + row[:, None] * stride_y + cols[None, :], mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(d * v, axis=1)
        tl.store(out_ptr + tokens * top_k + j, acc, mask=tokens < T)


def config(H: int) -> KernelConfig:
    """~4096 elements per program (16-byte accesses per thread over 4 warps); 256-wide column blocks for
    narrow rows (FP8 scales, small hidden sizes), 1024 otherwise."""
    block_h = 256 if H <= 256 else 1024
    return KernelConfig({"BLOCK_R": 4096 // block_h, "BLOCK_H": block_h}, num_warps=4)


def combine_config(H: int) -> KernelConfig:
    cfg = config(H)
    return KernelConfig({"BLOCK_T": cfg["BLOCK_R"], "BLOCK_H": cfg["BLOCK_H"]}, num_warps=4)


def row_dot_config() -> KernelConfig:
    return KernelConfig({"BLOCK_T": 16, "BLOCK_H": 256}, num_warps=4)


@register
def variants(arch: int):
    out = []
    dtypes = ("bf16", "fp32", "u8")  # u8: FP8 codes moving with their (fp32) scales
    for dtype, H in ((d, h) for d in dtypes for h in (7168, 256)):
        for weighted in (False, True) if dtype != "u8" else (False,):
            tag = f"{dtype},H{'<=256' if H <= 256 else '>256'}{',weighted' if weighted else ''}"
            out.append(variant(f"moe.gather_rows[{tag}]", gather_rows_kernel, config(H),
                               types={"x_ptr": f"*{dtype}", "slot_ptr": "*i32", "w_ptr": "*fp32",
                                      "out_ptr": f"*{dtype}"},
                               switches={"HAS_WEIGHT": weighted},
                               aligned=("x_ptr", "out_ptr", "H", "stride_x", "stride_out")))  # fmt: skip
    for dtype, H in ((d, h) for d in ("bf16", "fp32") for h in (7168, 256)):
        for weighted in (False, True):
            tag = f"{dtype},H{'<=256' if H <= 256 else '>256'}{',weighted' if weighted else ''}"
            out.append(variant(f"moe.combine_rows[{tag}]", combine_rows_kernel, combine_config(H),
                               types={"y_ptr": f"*{dtype}", "row_ptr": "*i32", "w_ptr": "*fp32",
                                      "out_ptr": f"*{dtype}"},
                               switches={"HAS_WEIGHT": weighted},
                               aligned=("y_ptr", "out_ptr", "H", "stride_y", "stride_out")))  # fmt: skip
    for dtype in ("bf16", "fp32"):
        out.append(variant(f"moe.row_dot[{dtype}]", row_dot_kernel, row_dot_config(),
                           types={"d_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "row_ptr": "*i32", "out_ptr": "*fp32"},
                           aligned=("d_ptr", "y_ptr", "H", "stride_d", "stride_y")))  # fmt: skip
    return out
