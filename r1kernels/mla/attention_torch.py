"""MLA attention in blocked torch ops: the CPU path (and the fp32 path on a GPU). Queries and keys go in blocks
with an online softmax, so memory is O(S x block) per head, never every head's [S, S] scores at once; causal
blocks above the diagonal are skipped. The backward recomputes each block's probabilities from the saved
log-sum-exp. All sums in fp32; every (batch, head) pair goes through the same batched products (the shared
rope key broadcast by the matmul, not copied per head)."""

from __future__ import annotations

import torch

BLOCK = 256  # queries and keys per block


def _blocks(S: int, causal: bool, q0: int):
    """Key block starts a query block starting at q0 attends to."""
    return range(0, min(S, q0 + BLOCK) if causal else S, BLOCK)


def _block_scores(qn, qp, kn, kp, q0, k0, scale, causal):
    """[B, H, Sq, Sk] scaled scores of a query block against a key block, -inf above the diagonal."""
    s = (torch.matmul(qn, kn.transpose(-1, -2)) + torch.matmul(qp, kp.transpose(-1, -2))) * scale
    if causal and k0 + kn.shape[-2] - 1 > q0:
        rows = torch.arange(q0, q0 + qn.shape[-2])[:, None]
        cols = torch.arange(k0, k0 + kn.shape[-2])[None, :]
        s = s.masked_fill((cols > rows).to(s.device), float("-inf"))
    return s


def _split(q, k_nope, k_pe, v, dn):
    """[B, S, H, *] -> head-major fp32 [B, H, S, *]; k_pe [B, S, Dr] -> [B, 1, S, Dr] (broadcast over heads)."""
    qf = q.float().transpose(1, 2)
    return (qf[..., :dn], qf[..., dn:], k_nope.float().transpose(1, 2), k_pe.float()[:, None],
            v.float().transpose(1, 2))  # fmt: skip


def forward(q, k_nope, k_pe, v, causal, scale):
    """q [B, S, H, Dn + Dr], k_nope [B, S, H, Dn], k_pe [B, S, Dr], v [B, S, H, Dv] -> (out [B, S, H, Dv] fp32,
    lse [B, H, S] fp32)."""
    S, dn = q.shape[1], k_nope.shape[-1]
    qn, qp, kn, kp, vv = _split(q, k_nope, k_pe, v, dn)
    B, H = qn.shape[:2]
    out = torch.empty(B, H, S, v.shape[-1], device=q.device)
    lse = torch.empty(B, H, S, device=q.device)
    for q0 in range(0, S, BLOCK):
        q1 = min(S, q0 + BLOCK)
        m = torch.full((B, H, q1 - q0, 1), float("-inf"), device=q.device)
        l_sum = torch.zeros(B, H, q1 - q0, 1, device=q.device)
        acc = torch.zeros(B, H, q1 - q0, v.shape[-1], device=q.device)
        for k0 in _blocks(S, causal, q0):
            k1 = min(S, k0 + BLOCK)
            s = _block_scores(qn[:, :, q0:q1], qp[:, :, q0:q1], kn[:, :, k0:k1], kp[:, :, k0:k1], q0, k0, scale,
                              causal)  # fmt: skip
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p = torch.exp(s - m_new)
            alpha = torch.exp(m - m_new)
            l_sum = l_sum * alpha + p.sum(-1, keepdim=True)
            acc = acc * alpha + torch.matmul(p, vv[:, :, k0:k1])
            m = m_new
        out[:, :, q0:q1] = acc / l_sum
        lse[:, :, q0:q1] = (m + torch.log(l_sum)).squeeze(-1)
    return out.transpose(1, 2), lse


def backward(q, k_nope, k_pe, v, out, lse, d_out, causal, scale):
    """Gradients (dq, dk_nope, dk_pe, dv) in fp32, recomputing each block's probabilities."""
    S, dn = q.shape[1], k_nope.shape[-1]
    qn, qp, kn, kp, vv = _split(q, k_nope, k_pe, v, dn)
    do = d_out.float().transpose(1, 2)  # [B, H, S, Dv]
    delta = (do * out.float().transpose(1, 2)).sum(-1, keepdim=True)  # [B, H, S, 1]
    lse = lse[..., None]
    dqn, dqp = torch.zeros_like(qn), torch.zeros_like(qp)
    dkn, dv = torch.zeros_like(kn), torch.zeros_like(vv)
    dkp = torch.zeros(kp.shape[0], S, kp.shape[-1], device=q.device)
    for k0 in range(0, S, BLOCK):
        k1 = min(S, k0 + BLOCK)
        for q0 in range((k0 // BLOCK) * BLOCK if causal else 0, S, BLOCK):
            q1 = min(S, q0 + BLOCK)
            s = _block_scores(qn[:, :, q0:q1], qp[:, :, q0:q1], kn[:, :, k0:k1], kp[:, :, k0:k1], q0, k0, scale,
                              causal)  # fmt: skip
            p = torch.exp(s - lse[:, :, q0:q1])
            dv[:, :, k0:k1] += torch.matmul(p.transpose(-1, -2), do[:, :, q0:q1])
            ds = p * (torch.matmul(do[:, :, q0:q1], vv[:, :, k0:k1].transpose(-1, -2)) - delta[:, :, q0:q1]) * scale
            dqn[:, :, q0:q1] += torch.matmul(ds, kn[:, :, k0:k1])
            dqp[:, :, q0:q1] += torch.matmul(ds, kp[:, :, k0:k1])
            dkn[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), qn[:, :, q0:q1])
            dkp[:, k0:k1] += torch.matmul(ds.transpose(-1, -2), qp[:, :, q0:q1]).sum(1)  # heads summed in order
    dq = torch.cat([dqn, dqp], -1).transpose(1, 2)
    return dq, dkn.transpose(1, 2), dkp, dv.transpose(1, 2)
