"""The GRPO loss of one token as a function of its log-prob (and entropy): the one place its formula lives.

``grpo_loss`` evaluates it on all tokens and lets autograd carry its gradient into the fused LM-head backward;
the single-pass training op (``fused_loss``) evaluates it on one block of tokens at a time, inside its
forward, to get ``d loss / d logp`` before it forms the block's logit gradients. Every aggregation is a
per-token weight (``aggregation_weights``), so the whole loss is ``sum(weight * token_loss)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from r1kernels._ext import ext


class TokenTerms(NamedTuple):
    """The per-token inputs ([N] fp32, or None) and scalars of the loss, besides logp and entropy."""

    weight: torch.Tensor  # aggregation weight: completion mask / the loss type's normaliser
    adv: torch.Tensor
    old: torch.Tensor | None  # None: on-policy (ratio 1, gradient of logp)
    ref: torch.Tensor | None  # None or beta == 0: no KL term
    is_ratio: torch.Tensor | None
    beta: float
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    clamp: float
    entropy_coef: float
    unbiased_kl: bool = False  # k3 times the (differentiable) ratio pi / pi_old: DeepSeek-V3.2's unbiased KL

    def rows(self, r0: int, r1: int) -> TokenTerms:
        """The terms of tokens r0:r1."""
        cut = {k: v[r0:r1] for k, v in self._asdict().items() if isinstance(v, torch.Tensor)}
        return self._replace(**cut)


def token_log_ratio(logp: torch.Tensor, old: torch.Tensor | None, clamp: float) -> torch.Tensor:
    """log(pi / pi_old), clamped to [-c, c] so exp cannot overflow (outside the clamp its gradient is 0)."""
    return torch.clamp(logp - (logp.detach() if old is None else old), -clamp, clamp)


def policy_loss(log_ratio: torch.Tensor, adv: torch.Tensor, t: TokenTerms) -> torch.Tensor:
    """``-min(min(r, delta) * A, clip(r, 1 - eps_low, 1 + eps_high) * A)``, times the rollout IS ratio."""
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - t.epsilon_low, 1 + t.epsilon_high)
    unclipped = ratio if t.delta is None else torch.clamp(ratio, max=t.delta)
    loss = -torch.minimum(unclipped * adv, clipped * adv)
    return loss if t.is_ratio is None else loss * t.is_ratio


def kl_k3(logp: torch.Tensor, ref: torch.Tensor, clamp: float) -> torch.Tensor:
    """k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref - logp clamped to [-c, c]."""
    d = torch.clamp(ref - logp, -clamp, clamp)
    return torch.exp(d) - d - 1


def token_kl(logp: torch.Tensor, log_ratio: torch.Tensor, t: TokenTerms) -> torch.Tensor:
    """The KL term's per-token value: k3, times the ratio when ``t.unbiased_kl``."""
    kl = kl_k3(logp, t.ref, t.clamp)
    return kl * torch.exp(log_ratio) if t.unbiased_kl else kl


def token_loss(logp: torch.Tensor, entropy: torch.Tensor, log_ratio: torch.Tensor, t: TokenTerms) -> torch.Tensor:
    """Each token's loss before aggregation: policy term, + beta * k3 (x ratio), - entropy_coef * entropy."""
    loss = policy_loss(log_ratio, t.adv, t)
    if t.beta > 0 and t.ref is not None:
        loss = loss + t.beta * token_kl(logp, log_ratio, t)
    if t.entropy_coef != 0.0:
        loss = loss - t.entropy_coef * entropy
    return loss


def aggregation_weights(mask, loss_type: str, seq_count, B: int, max_len: int | None, normaliser) -> torch.Tensor:
    """w such that the aggregated loss is sum(w * token_loss): ``grpo`` mask / (B * own sequence's tokens),
    ``bnpo`` mask / all tokens, ``dr_grpo`` mask / (B * max_len), ``dapo`` mask / normaliser. ``seq_count``:
    each token's sequence's completion-token count; ``normaliser``: dapo's divisor."""
    if loss_type == "grpo":
        return mask / (B * seq_count.clamp(min=1.0))
    if loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return mask / (B * max_len)
    return mask / normaliser


def _clamp_passes(x: torch.Tensor, low: float | None, high: float | None) -> torch.Tensor:
    """Where torch.clamp passes the gradient (inclusive bounds), as 0. / 1."""
    ok = torch.ones_like(x, dtype=torch.bool)
    if low is not None:
        ok &= x >= low
    if high is not None:
        ok &= x <= high
    return ok.to(x.dtype)


def block_gradients(logp: torch.Tensor, entropy: torch.Tensor, t: TokenTerms):
    """(sum of weighted token losses, d/d logp, d/d entropy or None) of a block of tokens, fp32.

    The fused op runs this inside its kernel implementation, where autograd does not record (a custom op's
    kernel runs below the autograd dispatch key), so the derivative of ``token_loss`` is written out here,
    following torch's own conventions (clamp passes the gradient at its bounds; minimum splits it at a tie).
    CPU tensors go to its C++ twin (csrc/grpo/token_loss_cpu.cpp: one loop instead of ~30 ops, ~100 us at
    decode sizes); ``test_fused_loss.py`` checks both forms against autograd through ``token_loss``.

    Tokens of weight 0 (padding) are not part of the loss: they add nothing (NaN included), get no gradient,
    and their ``logp`` and ``entropy`` are set to 0 IN PLACE (how the fused op reports them; the CPU's blocked
    forward does not compute them)."""
    if logp.device.type == "cpu":
        return _block_gradients_cpu(logp, entropy, t)
    return block_gradients_torch(logp, entropy, t)


def _ptr(x: torch.Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def _block_gradients_cpu(logp: torch.Tensor, entropy: torch.Tensor, t: TokenTerms):
    per_token = [x if x is None or x.is_contiguous() else x.contiguous() for x in (logp, entropy, *t[:5])]
    lp, ent, weight, adv, old, ref, is_ratio = per_token
    n, with_entropy = lp.shape[0], t.entropy_coef != 0.0
    total, d_logp = torch.empty(()), torch.empty(n)
    d_entropy = torch.empty(n) if with_entropy else None
    ext().grpo_token_loss_grad_cpu(
        n, lp.data_ptr(), ent.data_ptr(), weight.data_ptr(), adv.data_ptr(), _ptr(old),
        _ptr(ref if t.beta > 0 else None), _ptr(is_ratio), t.beta, t.epsilon_low, t.epsilon_high,
        0.0 if t.delta is None else t.delta, t.delta is not None, t.clamp, t.entropy_coef, t.unbiased_kl,
        total.data_ptr(), d_logp.data_ptr(), _ptr(d_entropy),
    )  # fmt: skip
    for given, dense in ((logp, lp), (entropy, ent)):  # the zero-weight tokens' 0s, into strided inputs too
        if dense is not given:
            given.copy_(dense)
    return total, d_logp, d_entropy


def block_gradients_torch(logp: torch.Tensor, entropy: torch.Tensor, t: TokenTerms):
    """``block_gradients`` in torch ops (GPU tensors, and the formulation the C++ twin follows line for line)."""
    unweighted = t.weight == 0
    logp.masked_fill_(unweighted, 0.0), entropy.masked_fill_(unweighted, 0.0)
    log_ratio = token_log_ratio(logp, t.old, t.clamp)
    raw = logp - logp if t.old is None else logp - t.old
    ratio = torch.exp(log_ratio)
    d_ratio = ratio * _clamp_passes(raw, -t.clamp, t.clamp)  # d ratio / d logp
    capped = ratio if t.delta is None else torch.clamp(ratio, max=t.delta)
    d_capped = 1.0 if t.delta is None else _clamp_passes(ratio, None, t.delta)
    clipped = torch.clamp(ratio, 1 - t.epsilon_low, 1 + t.epsilon_high)
    d_clipped = _clamp_passes(ratio, 1 - t.epsilon_low, 1 + t.epsilon_high)
    a, b = capped * t.adv, clipped * t.adv
    share_a = (a < b).to(a.dtype) + 0.5 * (a == b).to(a.dtype)  # which branch minimum() takes
    d_policy = -t.adv * (share_a * d_capped + (1 - share_a) * d_clipped) * d_ratio
    if t.is_ratio is not None:
        d_policy = d_policy * t.is_ratio
    loss = token_loss(logp, entropy, log_ratio, t)
    d_logp = d_policy
    if t.beta > 0 and t.ref is not None:
        raw_d = t.ref - logp
        d = torch.clamp(raw_d, -t.clamp, t.clamp)
        d_kl = -torch.expm1(d) * _clamp_passes(raw_d, -t.clamp, t.clamp)  # d k3 / d logp
        if t.unbiased_kl:  # d (ratio * k3) = k3 d ratio + ratio d k3
            d_kl = (torch.expm1(d) - d) * d_ratio + ratio * d_kl
        d_logp = d_logp + t.beta * d_kl
    d_entropy = None if t.entropy_coef == 0.0 else -t.entropy_coef * t.weight
    weighted = torch.where(unweighted, 0.0, t.weight * loss)  # 0 x NaN would be NaN
    return weighted.sum(), torch.where(unweighted, 0.0, t.weight * d_logp), d_entropy
