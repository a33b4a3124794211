"""Backward of the fused LM-head log-prob, first half: recompute a logits tile and write d loss / d logits
(``g / T * (onehot - softmax)``, plus the entropy term when asked) for one block into a bounded scratch.
The ``matmul`` kernel then turns the scratch into d hidden and d weight."""

from __future__ import annotations

import itertools

import triton
import triton.language as tl

from r1kernels._launch import KernelConfig
from r1kernels.compile_registry import register, variant
from r1kernels.grpo.kernels.logits_tile import DTYPE_CASES, case_tag, expm1, logits_tile, operand_sources
from r1kernels.shared.kernels.program_order import grouped_tile


@triton.jit
def logprob_grad_logits_kernel(
    h_ptr,  # [C, H] hidden rows of this token chunk, row stride stride_h
    w_ptr,  # [V, H] weight, row stride stride_w
    b_ptr,  # [V] bias (unused unless HAS_BIAS)
    y_ptr,  # [C] int64 target ids
    lse_ptr,  # [C] fp32 log-sum-exp of z from the forward
    g_ptr,  # [C] fp32 d loss / d logp
    ge_ptr,  # [C] fp32 d loss / d entropy (read only when ENTROPY_GRAD)
    ent_ptr,  # [C] fp32 entropy from the forward (read only when ENTROPY_GRAD)
    gz_ptr,  # [C, V] out: d loss / d logits (pre-temperature), dtype of the scratch buffer, row stride stride_gz
    z_ptr,  # [C, V] fp32 logits kept by the forward, row stride stride_z (read only when FROM_SCRATCH)
    N, V, H, stride_h, stride_w, stride_gz, col0, inv_t, stride_z,  # w_ptr / b_ptr start at vocab id col0
    HAS_BIAS: tl.constexpr, ENTROPY_GRAD: tl.constexpr, FROM_SCRATCH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    # grouped order: a resident wave covers GROUP_N token blocks x ~waves/GROUP_N vocab tiles, so hidden rows and
    # weight rows are each re-read from L2, not HBM (a row-fastest 2-D grid re-reads the hidden block per tile)
    block, tile = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    rows = block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tile.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = rows < N
    if FROM_SCRATCH:  # the single-pass training path: the forward kept the logits, nothing to recompute
        z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=ok[:, None] & (cols[None, :] < V),
                    other=float("-inf"))  # fmt: skip
    else:
        h_src, w_src = operand_sources(h_ptr, w_ptr, N, V, H, stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_H, USE_TMA)
        z = logits_tile(h_src, w_src, b_ptr, rows, cols, block * BLOCK_N, tile * BLOCK_V, N, V, H, stride_h,
                        stride_w, inv_t, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, USE_TMA)  # fmt: skip
    lse = tl.load(lse_ptr + rows, mask=ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=ok, other=-1)
    x = z - lse[:, None]  # log-probs
    # logp = z_y - lse(z) and z = logits / T, so d logp / d logits = (onehot - p) / T. For the target column
    # 1 - p cancels when the policy is confident (p -> 1): use -expm1(x) there, which keeps full precision.
    is_y = (cols + col0)[None, :] == y[:, None]
    p = tl.exp(x)
    gz = g[:, None] * tl.where(is_y, -expm1(x), -p)
    if ENTROPY_GRAD:
        # entropy E = -sum p log p, so d E / d z_k = -p_k (log p_k + E)
        ge = tl.load(ge_ptr + rows, mask=ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=ok, other=0.0)
        x_in = tl.where(cols[None, :] < V, x, 0.0)  # past V: p = 0 and x = -inf, whose product is NaN
        gz -= ge[:, None] * p * (x_in + ent[:, None])
    gz = gz * inv_t
    tl.store(gz_ptr + rows[:, None] * stride_gz + cols[None, :], gz.to(gz_ptr.dtype.element_ty),
             mask=ok[:, None] & (cols[None, :] < V))  # fmt: skip


def config(dtype_bytes: int, arch: int | None, precision: str) -> KernelConfig:
    if dtype_bytes == 4:
        return KernelConfig({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32, "GROUP_N": 8}, num_warps=4)
    if arch is not None and arch >= 90:
        return KernelConfig({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8)
    return KernelConfig({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=4)


@register
def variants(arch: int):
    out = []
    types = {"y_ptr": "*i64", "lse_ptr": "*fp32", "g_ptr": "*fp32", "ge_ptr": "*fp32", "ent_ptr": "*fp32",
             "z_ptr": "*fp32", "inv_t": "fp32"}  # fmt: skip
    aligned = ("h_ptr", "w_ptr", "gz_ptr", "z_ptr", "V", "H", "stride_h", "stride_w", "stride_gz", "col0", "stride_z")
    for tl_type, nbytes, precision in DTYPE_CASES:
        tag, kind = case_tag(tl_type, nbytes, precision)
        io = {"h_ptr": f"*{tl_type}", "w_ptr": f"*{tl_type}", "b_ptr": f"*{tl_type}", "gz_ptr": f"*{tl_type}"}
        for entropy_grad, from_scratch, tma in itertools.product((False, True), (False, True), (False, True)):
            if from_scratch and (precision == "ieee" or tma):
                continue  # no dot when reading the kept logits: one fp32 variant covers both precisions
            if tma and (arch < 90 or nbytes != 2):
                continue  # TMA where the launcher may choose it: sm_90a, 16-bit
            name = f"{tag if not from_scratch else tl_type}{',entropy' if entropy_grad else ''}"
            name += ",from_scratch" if from_scratch else ",tma" if tma else ""
            out.append(variant(
                f"grpo.logprob_grad_logits[{name}]", logprob_grad_logits_kernel,
                config(nbytes, arch, precision), kind="memory" if from_scratch else kind, types={**types, **io},
                switches={"HAS_BIAS": False, "ENTROPY_GRAD": entropy_grad, "FROM_SCRATCH": from_scratch,
                          "PRECISION": precision, "USE_TMA": tma},
                aligned=aligned,
            ))  # fmt: skip
    return out
