"""MLA attention forward (FlashAttention-2 style): per (query block, sequence, head), keys streamed in blocks
with an online softmax. Scores = q_nope . k_nope + q_pe . k_pe, the rope key k_pe read once per sequence
position for every head (never broadcast in memory); V tiles are Dv wide, not padded to the QK dim."""

from __future__ import annotations

import triton
import triton.language as tl

from r1kernels._launch import KernelConfig
from r1kernels.compile_registry import register, variant

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def sequence_bounds(cu_ptr, pid_b, S, VARLEN: tl.constexpr):
    """(first token, length) of sequence pid_b: a packed sequence from cu_seqlens, or batch row pid_b."""
    if VARLEN:
        start = tl.load(cu_ptr + pid_b).to(tl.int64)
        return start, (tl.load(cu_ptr + pid_b + 1) - tl.load(cu_ptr + pid_b)).to(tl.int32)
    return (pid_b * 0).to(tl.int64), S


@triton.jit
def mla_fwd_kernel(
    q_ptr, kn_ptr, kp_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr,
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
    batch = pid_b * (1 - VARLEN)  # packed sequences live in batch row 0
    q_ptr += batch * stride_qb + start * stride_qs + h * stride_qh
    kn_ptr += batch * stride_kb + start * stride_ks + h * stride_kh
    kp_ptr += batch * stride_pb + start * stride_ps
    v_ptr += batch * stride_vb + start * stride_vs + h * stride_vh
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen
    dn, dr, dv = tl.arange(0, DN), tl.arange(0, DR), tl.arange(0, DV)
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qs
    q_nope = tl.load(q_rows + dn[None, :], mask=row_ok[:, None], other=0.0)
    q_pe = tl.load(q_rows + DN + dr[None, :], mask=row_ok[:, None], other=0.0)
    qk_scale = scale * LOG2E  # exp2 domain
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DV), tl.float32)
    hi = tl.minimum(seqlen, (pid_m + 1) * BLOCK_M) if CAUSAL else seqlen
    for n0 in tl.range(0, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < seqlen
        c64 = cols.to(tl.int64)[:, None]
        kn = tl.load(kn_ptr + c64 * stride_ks + dn[None, :], mask=col_ok[:, None], other=0.0)
        kp = tl.load(kp_ptr + c64 * stride_ps + dr[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptr + c64 * stride_vs + dv[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q_nope, tl.trans(kn), input_precision=PRECISION)
        s = tl.dot(q_pe, tl.trans(kp), s, input_precision=PRECISION) * qk_scale
        keep = col_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o_rows = o_ptr + batch * stride_ob + (start + rows.to(tl.int64))[:, None] * stride_os + h * stride_oh
    tl.store(o_rows + dv[None, :], out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.log2(l_i)) / LOG2E
    tl.store(lse_ptr + batch * stride_lb + h * stride_lh + start + rows, lse, mask=row_ok)


PRECISION = "tf32"  # ignored for the 16-bit operands these kernels take (fp32 attention runs the torch path)


def config(dk: int, dv: int, arch: int | None) -> KernelConfig:
    """64 queries x 64 keys; 8 warps for DeepSeek's 192 / 128 head dims (4 below)."""
    warps = 8 if dk + dv > 192 else 4
    return KernelConfig({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=warps, num_stages=2)


HEAD_DIMS = ((128, 64, 128), (64, 32, 64), (32, 16, 32))  # (Dn, Dr, Dv): DeepSeek-V3's and smaller models'


def attention_variants(kernel, name: str, arch: int, config_fn, extra=None):
    out = []
    for (dn, dr, dv), dtype, causal, varlen in (
        [(hd, "bf16", True, False) for hd in HEAD_DIMS]
        + [(HEAD_DIMS[0], "bf16", False, False), (HEAD_DIMS[0], "bf16", True, True),
           (HEAD_DIMS[0], "fp16", True, False)]
    ):  # fmt: skip
        types = {p: f"*{dtype}" for p in kernel.arg_names if p.endswith("_ptr")}
        types.update({"lse_ptr": "*fp32", "cu_ptr": "*i32", "scale": "fp32", **(extra or {})})
        tag = f"{dtype},{dn}+{dr}/{dv}{',causal' if causal else ''}{',varlen' if varlen else ''}"
        out.append(variant(
            f"mla.{name}[{tag}]", kernel, config_fn(dn + dr, dv, arch), kind="matrix", types=types,
            switches={"DN": dn, "DR": dr, "DV": dv, "CAUSAL": causal, "VARLEN": varlen, "PRECISION": PRECISION},
            aligned=tuple(p for p in kernel.arg_names if (p.startswith("stride_") or p.endswith("_ptr"))
                          and p not in ("stride_lb", "stride_lh", "cu_ptr")),
        ))  # fmt: skip
    return out


@register
def variants(arch: int):
    return attention_variants(mla_fwd_kernel, "attention_fwd", arch, config)
