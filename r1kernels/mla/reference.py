"""Plain PyTorch MLA attention in float64: the truth the kernels are tested against."""

from __future__ import annotations

import itertools

import torch


def mla_attention(q, k_nope, k_pe, v, causal=True, softmax_scale=None, cu_seqlens=None):
    """(out [B, S, H, Dv], lse [B, H, S]) in float64 from the full score matrix; differentiable. The rope key
    k_pe [B, S, Dr] is shared by every head. With cu_seqlens the batch dim is 1 and sequences are packed."""
    dn = k_nope.shape[-1]
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if cu_seqlens is not None:
        outs, lses = [], []
        bounds = cu_seqlens.tolist()
        for lo, hi in itertools.pairwise(bounds):
            o, lse = mla_attention(q[:, lo:hi], k_nope[:, lo:hi], k_pe[:, lo:hi], v[:, lo:hi], causal, scale)
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs, 1), torch.cat(lses, 2)
    q64, kn, kp, v64 = (t.double() for t in (q, k_nope, k_pe, v))
    s = torch.einsum("bshd,bthd->bhst", q64[..., :dn], kn) + torch.einsum("bshd,btd->bhst", q64[..., dn:], kp)
    s = s * scale
    S = q.shape[1]
    if causal:
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.einsum("bhst,bthd->bshd", p, v64), lse


def mla_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal=True):
    """(out [B, s_q, H, 512], lse [B, H, s_q]) in float64, one (sequence, query, head) at a time."""
    B, s_q, H, _ = q.shape
    page = kv_cache.shape[1]
    out = torch.zeros(B, s_q, H, 512, dtype=torch.float64)
    lse = torch.full((B, H, s_q), float("inf"), dtype=torch.float64)
    for b in range(B):
        n = int(cache_seqlens[b])
        keys = torch.cat([kv_cache[int(block_table[b, j // page]), j % page][None] for j in range(n)]) if n else None
        for i in range(s_q):
            visible = min(n, n - s_q + i + 1) if causal else n
            if visible <= 0:
                continue
            k = keys[:visible].double()
            s = q[b, i].double() @ k.T * softmax_scale  # [H, visible]
            lse[b, :, i] = torch.logsumexp(s, dim=-1)
            out[b, i] = torch.softmax(s, dim=-1) @ k[:, :512]
    return out, lse
