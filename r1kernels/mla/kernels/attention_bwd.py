"""MLA attention backward (FlashAttention-2 style, scores recomputed from the saved log-sum-exp):

mla_bwd_kv_kernel  per (key block, sequence, head): dk_nope, dv, and this head's share of dk_pe
                   (an fp32 [B, H, S, Dr] partial; the launcher sums it over heads in a fixed order:
                   the shared rope key's gradient without float atomics, so runs are bitwise equal)
mla_bwd_q_kernel   per (query block, sequence, head): dq (nope and rope parts)
"""

from __future__ import annotations

import triton
import triton.language as tl

from r1kernels._launch import KernelConfig
from r1kernels.compile_registry import register
from r1kernels.mla.kernels.attention_fwd import attention_variants, sequence_bounds


@triton.jit
def _scores(q_nope, q_pe, kn, kp, rows, cols, seqlen, lse, scale, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """P [BLOCK_M, BLOCK_N] = exp(q.k * scale - lse), 0 where masked."""
    s = tl.dot(q_nope, tl.trans(kn), input_precision=PRECISION)
    s = tl.dot(q_pe, tl.trans(kp), s, input_precision=PRECISION) * scale
    keep = (rows[:, None] < seqlen) & (cols[None, :] < seqlen)
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    return tl.where(keep, tl.exp(s - lse[:, None]), 0.0)


@triton.jit
def mla_bwd_kv_kernel(
    q_ptr, kn_ptr, kp_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dkn_ptr, dkp_ptr, dv_ptr, cu_ptr,
    S, H, scale,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_pb, stride_ps,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (key block, sequence): every head in turn, so the shared rope key's gradient is summed over the
    heads in registers, in head order, and stored once (no atomics: bitwise reproducible)."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    start, seqlen = sequence_bounds(cu_ptr, pid_b, S, VARLEN)
    if pid_n * BLOCK_N >= seqlen:
        return
    batch = pid_b * (1 - VARLEN)
    dr = tl.arange(0, DR)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < seqlen
    kp_rows = kp_ptr + batch * stride_pb + (start + cols.to(tl.int64))[:, None] * stride_ps
    kp = tl.load(kp_rows + dr[None, :], mask=col_ok[:, None], other=0.0)
    d_kp = tl.zeros((BLOCK_N, DR), tl.float32)
    for h in tl.range(0, H):
        d_kp = _kv_head(q_ptr, kn_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dkn_ptr, dv_ptr, kp, d_kp, h, batch, start,
                        seqlen, pid_n, scale, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                        stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, DN,
                        DR, DV, CAUSAL, PRECISION, BLOCK_M, BLOCK_N)  # fmt: skip
    dkp_rows = dkp_ptr + batch * stride_pb + (start + cols.to(tl.int64))[:, None] * stride_ps  # k_pe's layout
    tl.store(dkp_rows + dr[None, :], d_kp.to(dkp_ptr.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _kv_head(q_ptr, kn_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dkn_ptr, dv_ptr, kp, d_kp, h, batch, start, seqlen,
             pid_n, scale, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
             stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, DN: tl.constexpr, DR: tl.constexpr,
             DV: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr):  # fmt: skip
    h64 = tl.cast(h, tl.int64)  # (a Python int in the interpreter)
    dn, dr, dv_ = tl.arange(0, DN), tl.arange(0, DR), tl.arange(0, DV)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < seqlen
    c64 = cols.to(tl.int64)[:, None]
    q_h = q_ptr + batch * stride_qb + start * stride_qs + h64 * stride_qh
    do_h = do_ptr + batch * stride_ob + start * stride_os + h64 * stride_oh
    kn_off = batch * stride_kb + start * stride_ks + h64 * stride_kh
    v_off = batch * stride_vb + start * stride_vs + h64 * stride_vh
    stats = batch * stride_lb + h64 * stride_lh + start
    kn = tl.load(kn_ptr + kn_off + c64 * stride_ks + dn[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_ptr + v_off + c64 * stride_vs + dv_[None, :], mask=col_ok[:, None], other=0.0)
    d_kn = tl.zeros((BLOCK_N, DN), tl.float32)
    d_v = tl.zeros((BLOCK_N, DV), tl.float32)
    lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for m0 in tl.range(lo, seqlen, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < seqlen
        r64 = rows.to(tl.int64)[:, None]
        q_nope = tl.load(q_h + r64 * stride_qs + dn[None, :], mask=row_ok[:, None], other=0.0)
        q_pe = tl.load(q_h + r64 * stride_qs + DN + dr[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_h + r64 * stride_os + dv_[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + stats + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + stats + rows, mask=row_ok, other=0.0)
        p = _scores(q_nope, q_pe, kn, kp, rows, cols, seqlen, lse, scale, CAUSAL, PRECISION)
        d_v = tl.dot(tl.trans(p.to(do.dtype)), do, d_v, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None]) * scale).to(q_nope.dtype)
        d_kn = tl.dot(tl.trans(ds), q_nope, d_kn, input_precision=PRECISION)
        d_kp = tl.dot(tl.trans(ds), q_pe, d_kp, input_precision=PRECISION)
    tl.store(dkn_ptr + kn_off + c64 * stride_ks + dn[None, :], d_kn.to(dkn_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr + v_off + c64 * stride_vs + dv_[None, :], d_v.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])
    return d_kp


@triton.jit
def mla_bwd_q_kernel(
    q_ptr, kn_ptr, kp_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr,
    S, H, scale,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_pb, stride_ps,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_b = (tl.program_id(1) // H).to(tl.int64)
    h = (tl.program_id(1) % H).to(tl.int64)
    start, seqlen = sequence_bounds(cu_ptr, pid_b, S, VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return
    batch = pid_b * (1 - VARLEN)
    q_off = batch * stride_qb + start * stride_qs + h * stride_qh  # dq has q's strides
    kn_ptr += batch * stride_kb + start * stride_ks + h * stride_kh
    kp_ptr += batch * stride_pb + start * stride_ps
    v_ptr += batch * stride_vb + start * stride_vs + h * stride_vh
    stats = batch * stride_lb + h * stride_lh + start
    dn, dr, dv_ = tl.arange(0, DN), tl.arange(0, DR), tl.arange(0, DV)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen
    r64 = rows.to(tl.int64)[:, None]
    q_nope = tl.load(q_ptr + q_off + r64 * stride_qs + dn[None, :], mask=row_ok[:, None], other=0.0)
    q_pe = tl.load(q_ptr + q_off + r64 * stride_qs + DN + dr[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + batch * stride_ob + (start + r64) * stride_os + h * stride_oh + dv_[None, :],
                 mask=row_ok[:, None], other=0.0)  # fmt: skip
    lse = tl.load(lse_ptr + stats + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + stats + rows, mask=row_ok, other=0.0)
    d_qn = tl.zeros((BLOCK_M, DN), tl.float32)
    d_qp = tl.zeros((BLOCK_M, DR), tl.float32)
    hi = tl.minimum(seqlen, (pid_m + 1) * BLOCK_M) if CAUSAL else seqlen
    for n0 in tl.range(0, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < seqlen
        c64 = cols.to(tl.int64)[:, None]
        kn = tl.load(kn_ptr + c64 * stride_ks + dn[None, :], mask=col_ok[:, None], other=0.0)
        kp = tl.load(kp_ptr + c64 * stride_ps + dr[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptr + c64 * stride_vs + dv_[None, :], mask=col_ok[:, None], other=0.0)
        p = _scores(q_nope, q_pe, kn, kp, rows, cols, seqlen, lse, scale, CAUSAL, PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None]) * scale).to(kn.dtype)
        d_qn = tl.dot(ds, kn, d_qn, input_precision=PRECISION)
        d_qp = tl.dot(ds, kp, d_qp, input_precision=PRECISION)
    out = dq_ptr + q_off + r64 * stride_qs
    tl.store(out + dn[None, :], d_qn.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(out + DN + dr[None, :], d_qp.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


def kv_config(dk: int, dv: int, arch: int | None) -> KernelConfig:
    """8 warps. The program walks every head, so its live state is one head's key / value tiles and gradients
    beside the shared rope key and its running gradient: sm_90a 64 keys x 16-query steps (wgmma needs the 64
    rows of the key-side products), sm_80 / sm_89 32 x 32 (larger tiles spilled 24-368 B)."""
    if arch is not None and arch >= 90:
        return KernelConfig({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8, num_stages=2)
    return KernelConfig({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2)


def q_config(dk: int, dv: int, arch: int | None) -> KernelConfig:
    """sm_90a: 64 queries over two warpgroups (wgmma needs 64 rows per warpgroup); sm_80 / sm_89: 32 queries
    over 4 warps (64 x 32 over 8 spilled 56 B there), 32 keys per step for smaller heads (64 spilled 24 B)."""
    if arch is not None and arch >= 90:
        return KernelConfig({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2)
    return KernelConfig({"BLOCK_M": 32, "BLOCK_N": 64 if dk + dv > 192 else 32}, num_warps=4, num_stages=2)


@register
def variants(arch: int):
    stats = {"lse_ptr": "*fp32", "delta_ptr": "*fp32"}
    kv = attention_variants(mla_bwd_kv_kernel, "attention_bwd_kv", arch, kv_config, stats)
    return kv + attention_variants(mla_bwd_q_kernel, "attention_bwd_q", arch, q_config, stats)
