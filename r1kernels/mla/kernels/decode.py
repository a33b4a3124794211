"""MLA decode over a paged latent cache (FlashMLA's layout), split-KV: each program takes one sequence, a
block of (query, head) rows (every head reads the same latent, so heads are the MMA's rows) and one split of
the sequence's pages; a combine kernel merges the splits by their log-sum-exp. Keys are the 576-wide latents
(512 c_kv + 64 rope), values their first 512 columns; pages past a sequence's length are never loaded."""

from __future__ import annotations

import itertools

import triton
import triton.language as tl

from r1kernels._launch import KernelConfig
from r1kernels.compile_registry import register, variant

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
DC: tl.constexpr = tl.constexpr(512)  # latent (value) width
DR: tl.constexpr = tl.constexpr(64)  # rope width; keys are DC + DR = 576 wide


@triton.jit
def mla_decode_split_kernel(
    q_ptr,  # [B, s_q, H, 576], (s_q, H) rows dense: row r = query r // H, head r % H at q + b * stride_qb + r * 576
    cache_ptr,  # [num_blocks, PAGE, 576]
    table_ptr,  # [B, max_blocks] int32
    seqlens_ptr,  # [B] int32
    o_ptr,  # [B, SPLITS, R, 512] fp32 partial outputs (normalized within the split)
    lse_ptr,  # [B, SPLITS, R] fp32 partial log-sum-exp (-inf: the split saw no key)
    R, H, s_q, keys_per_split, scale, stride_qb, stride_cb, stride_tb,
    CAUSAL: tl.constexpr, PAGE: tl.constexpr, SPLITS: tl.constexpr, VALUE_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (b, row block, split); VALUE_HALF (one launch each) picks the 256 value columns it outputs: the
    scores use all 576 key columns, and a 64 x 512 fp32 accumulator does not fit beside the operands."""
    HALF: tl.constexpr = DC // 2
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2).to(tl.int64)
    row_ok = rows < R
    seqlen = tl.load(seqlens_ptr + b)
    # bottom-right aligned causal mask: query i sees keys j <= seqlen - s_q + i
    limit = seqlen - s_q + rows // H + 1 if CAUSAL else tl.zeros((BLOCK_H,), tl.int32) + seqlen
    limit = tl.minimum(tl.maximum(limit, 0), seqlen)
    da, dr = tl.arange(0, HALF), tl.arange(0, DR)
    q_rows = q_ptr + b * stride_qb + rows.to(tl.int64)[:, None] * (DC + DR)
    q_a = tl.load(q_rows + da[None, :], mask=row_ok[:, None], other=0.0)
    q_b = tl.load(q_rows + HALF + da[None, :], mask=row_ok[:, None], other=0.0)
    q_r = tl.load(q_rows + DC + dr[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, HALF), tl.float32)
    first = split * keys_per_split
    last = tl.minimum(first + keys_per_split, seqlen)
    for n0 in tl.range(first, last, BLOCK_N):  # BLOCK_N divides PAGE: a step never crosses a page
        block = tl.load(table_ptr + b * stride_tb + n0 // PAGE).to(tl.int64)
        cols = n0 + tl.arange(0, BLOCK_N)
        key_ok = cols < seqlen  # slots past the sequence's end are never loaded
        c_rows = cache_ptr + block * stride_cb + (cols % PAGE).to(tl.int64)[:, None] * (DC + DR)
        c_a = tl.load(c_rows + da[None, :], mask=key_ok[:, None], other=0.0)
        c_b = tl.load(c_rows + HALF + da[None, :], mask=key_ok[:, None], other=0.0)
        c_r = tl.load(c_rows + DC + dr[None, :], mask=key_ok[:, None], other=0.0)
        s = tl.dot(q_a, tl.trans(c_a))
        s = tl.dot(q_b, tl.trans(c_b), s)
        s = tl.dot(q_r, tl.trans(c_r), s) * (scale * LOG2E)
        s = tl.where(cols[None, :] < limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: nothing to rescale
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        value = c_b if VALUE_HALF else c_a
        acc = acc * alpha[:, None] + tl.dot(p.to(value.dtype), value)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    part = (b * SPLITS + split) * R + rows.to(tl.int64)
    tl.store(o_ptr + part[:, None] * DC + VALUE_HALF * HALF + da[None, :], out, mask=row_ok[:, None])
    if not VALUE_HALF:  # both launches find the same statistics: one writes them
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / LOG2E, float("-inf"))
        tl.store(lse_ptr + part, lse, mask=row_ok)


@triton.jit
def mla_decode_combine_kernel(
    o_part_ptr,  # [B, SPLITS, R, 512] fp32
    lse_part_ptr,  # [B, SPLITS, R] fp32
    out_ptr,  # [B, s_q, H, 512]: row r at out + (b * R + r) * 512
    lse_ptr,  # [B, H, s_q] fp32: row r = (i, h) at lse + b * R + h * s_q + i; +inf where nothing was attended
    R, H, s_q,
    SPLITS: tl.constexpr,
):  # fmt: skip
    """One (sequence, row) per program: the splits' partials [SPLITS, 512] weighted by exp(lse_s - lse)."""
    b = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    parts = (b * SPLITS + tl.arange(0, SPLITS)) * R + row
    lse_s = tl.load(lse_part_ptr + parts)
    m = tl.max(lse_s, axis=0)
    has = m > float("-inf")
    m_safe = tl.where(has, m, 0.0)
    w = tl.exp(lse_s - m_safe)  # 0 for splits that saw no key
    total = tl.sum(w, axis=0)
    w = w / tl.where(has, total, 1.0)
    dc = tl.arange(0, DC)
    o = tl.load(o_part_ptr + parts[:, None] * DC + dc[None, :])
    out = tl.sum(o * w[:, None], axis=0)
    tl.store(out_ptr + (b * R + row) * DC + dc, out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + b * R + (row % H) * s_q + row // H, tl.where(has, m_safe + tl.log(tl.where(has, total, 1.0)),
                                                                    float("inf")))  # fmt: skip


def config(page: int) -> KernelConfig:
    """64 (query, head) rows (wgmma takes 64 rows per warpgroup) x 16 keys per step x 256 value columns over
    8 warps: the full 512-column accumulator spilled 16-456 B, 64-key steps overflowed shared memory."""
    return KernelConfig({"BLOCK_H": 64, "BLOCK_N": 16}, num_warps=8, num_stages=2)


def combine_config() -> KernelConfig:
    return KernelConfig({}, num_warps=4)


SPLITS = 8  # key splits per sequence: B x ceil(R / 16) x 8 programs fill an H100 from B = 4 at 128 heads
PAGES = (64, 32, 16)


@register
def variants(arch: int):
    out = []
    cases = [("bf16", p, True) for p in PAGES] + [("bf16", 64, False), ("fp16", 64, True)]
    for (dtype, page, causal), half in itertools.product(cases, (0, 1)):
        out.append(variant(
            f"mla.decode_split[{dtype},page{page}{',causal' if causal else ''},values{half}]", mla_decode_split_kernel,
            config(page), kind="matrix",
            types={"q_ptr": f"*{dtype}", "cache_ptr": f"*{dtype}", "table_ptr": "*i32", "seqlens_ptr": "*i32",
                   "o_ptr": "*fp32", "lse_ptr": "*fp32", "scale": "fp32"},
            switches={"CAUSAL": causal, "PAGE": page, "SPLITS": SPLITS, "VALUE_HALF": half},
            aligned=("q_ptr", "cache_ptr", "o_ptr", "stride_qb", "stride_cb"),
        ))  # fmt: skip
    for dtype in ("bf16", "fp16"):
        out.append(variant(
            f"mla.decode_combine[{dtype}]", mla_decode_combine_kernel, combine_config(),
            types={"o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "out_ptr": f"*{dtype}", "lse_ptr": "*fp32"},
            switches={"SPLITS": SPLITS}, aligned=("o_part_ptr", "out_ptr"),
        ))  # fmt: skip
    return out
