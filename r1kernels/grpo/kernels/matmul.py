"""Backward of the fused LM-head log-prob, second half: C (+)= A @ B with fp32 accumulation, which turns the
d-logits scratch G into d hidden = G @ W and d weight (+)= G^T @ H."""

from __future__ import annotations

import triton
import triton.language as tl

from r1kernels._launch import KernelConfig
from r1kernels.compile_registry import register, variant
from r1kernels.grpo.kernels.logits_tile import DTYPE_CASES, case_tag
from r1kernels.shared.kernels.program_order import grouped_tile


@triton.jit
def matmul_kernel(
    a_ptr,  # [M, K] strides (stride_am, stride_ak)
    b_ptr,  # [K, N] strides (stride_bk, stride_bn)
    c_ptr,  # [M, N] strides (stride_cm, 1); fp32 when ACCUMULATE
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """C = A @ B (or C += A @ B when ACCUMULATE) with fp32 accumulation; grouped tile order for L2 reuse."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # 64-bit addresses: the pointers advance by BLOCK_K * stride each step (a 64-bit pointer add), so no 32-bit
    # product of a K index and a stride is ever formed ((K - 1) * stride passes 2**31 at V = 152064, H = 16384)
    rk64 = rk.to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk64[None, :] * stride_ak
    b_ptrs = b_ptr + rk64[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < K - k0) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :]
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def config(dtype_bytes: int, arch: int | None, precision: str) -> KernelConfig:
    if dtype_bytes == 4 and precision == "ieee":
        # full-fp32 FMA dots hold both operand tiles in registers, beside their 64-bit pointers: 8 warps
        return KernelConfig({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=8)
    if dtype_bytes == 4:
        return KernelConfig({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4)
    if arch is not None and arch >= 90:
        return KernelConfig({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8)
    return KernelConfig({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8)


@register
def variants(arch: int):
    out = []
    for tl_type, nbytes, precision in DTYPE_CASES:
        tag, kind = case_tag(tl_type, nbytes, precision)
        # Launches see unit strides specialised to constexpr 1 (Triton's JIT does this for ints equal to 1):
        # d hidden = G @ W has A and B row-major; d weight = G^T @ H reads A = G^T column-major. Whichever of
        # the two is accumulated over blocks writes an fp32 buffer (see lm_head_logprobs._backward_triton).
        for accumulate in (False, True):
            c_type = "fp32" if accumulate else tl_type
            for unit in (("stride_ak", "stride_bn"), ("stride_am", "stride_bn")):
                layout = "A^T" if "stride_am" in unit else "A"
                aligned = [
                    a for a in ("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_cm") if a not in unit
                ]
                out.append(variant(
                    f"grpo.matmul[{tag}->{c_type}{',acc' if accumulate else ''},{layout}]", matmul_kernel,
                    config(nbytes, arch, precision), kind=kind, unit=unit,
                    types={"a_ptr": f"*{tl_type}", "b_ptr": f"*{tl_type}", "c_ptr": f"*{c_type}"},
                    switches={"ACCUMULATE": accumulate, "PRECISION": precision},
                    aligned=("a_ptr", "b_ptr", "c_ptr", *aligned),
                ))  # fmt: skip
    return out
