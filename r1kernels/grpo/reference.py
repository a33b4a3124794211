"""Plain PyTorch GRPO in float64 on full logits: the truth the fused kernels are tested against.

Written from the formulas, independently of ``loss.py`` so that a formula wrong in one is caught by the other:
on padded [B, T] tensors and the full logits, the log-softmax written out, the clipped surrogate in PPO's case
form (by the sign of the advantage), the k3 KL as ``rho - log(rho) - 1``, and every aggregation spelled out per
loss type
(DeepSeekMath eq. 3; TRL's GRPOTrainer for the loss types and clip metrics; GSPO for the sequence ratio).
"""

from __future__ import annotations

import torch


def token_logprobs(hidden, weight, token_ids, bias=None, temperature: float = 1.0):
    """(logp, entropy) of ``token_ids`` under ``softmax((hidden @ weight.T + bias) / temperature)``, float64,
    on the full logits, the log-softmax written out. ``hidden [..., H]``, ``token_ids [...]``."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z / temperature
    m = z.max(dim=-1, keepdim=True).values.detach()
    log_p = z - (m + torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True)))
    logp = log_p.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    return logp, -(torch.exp(log_p) * log_p).sum(dim=-1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4):
    """(r - mean of its group) / (std + eps), one group at a time in float64; std unbiased, as TRL's."""
    r = rewards.double()
    out = torch.empty_like(r)
    batch_std = r.std() if scale == "batch" else None
    for g0 in range(0, r.numel(), group_size):
        group = r[g0 : g0 + group_size]
        centred = group - group.sum() / group_size
        if scale == "group":
            centred = centred / (group.std() + eps)
        elif scale == "batch":
            centred = centred / (batch_std + eps)
        out[g0 : g0 + group_size] = centred
    return out


def _surrogate(ratio, capped, adv, epsilon_low, epsilon_high):
    """PPO's clipped objective by the sign of the advantage: A * min(u, c) for A >= 0, A * max(u, c) for A < 0,
    u the (optionally delta-capped) ratio, c the ratio clipped to [1 - eps_low, 1 + eps_high]."""
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return torch.where(adv >= 0, adv * torch.minimum(capped, clipped), adv * torch.maximum(capped, clipped))


def grpo_loss(
    hidden,  # [B, T, H]
    weight,  # [V, H]
    token_ids,  # [B, T]
    completion_mask,  # [B, T]
    advantages,  # [B] or [B, T]
    *,
    bias=None,
    old_logps=None,
    ref_logps=None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    temperature: float = 1.0,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    num_processes: int = 1,
    importance_sampling_level: str = "token",
    rollout_is_ratio=None,
    log_ratio_clamp: float = 20.0,
    entropy_coef: float = 0.0,
    unbiased_kl: bool = False,
):
    """Returns (loss, metrics) in float64; differentiable w.r.t. hidden / weight / bias if they require grad."""
    if importance_sampling_level not in ("token", "sequence", "sequence_token"):
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    c = log_ratio_clamp
    B, T = token_ids.shape
    mask = completion_mask.double()
    logp, entropy = token_logprobs(hidden, weight, token_ids, bias, temperature)
    with_kl = ref_logps is not None and beta != 0.0

    adv = advantages.double() if advantages.dim() == 2 else advantages.double()[:, None].expand(B, T)
    n = mask.sum(dim=-1)  # completion tokens per sequence [B]
    if old_logps is None:
        log_ratio = torch.clamp(logp - logp.detach(), -c, c)  # on-policy: ratio 1, gradient of logp
    else:
        log_ratio = torch.clamp(logp - old_logps.double(), -c, c)
    if importance_sampling_level != "token":
        seq_log_ratio = (log_ratio * mask).sum(dim=-1) / torch.clamp(n, min=1.0)  # GSPO: length-normalised
        if importance_sampling_level == "sequence":
            log_ratio = seq_log_ratio[:, None].expand(B, T)
        else:  # GSPO-token: the sequence ratio's value, each token's own gradient
            log_ratio = seq_log_ratio.detach()[:, None] + logp - logp.detach()
    ratio = torch.exp(log_ratio)
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token = -_surrogate(ratio, capped, adv, epsilon_low, epsilon_high)
    if rollout_is_ratio is not None:
        per_token = per_token * rollout_is_ratio.double()
    per_token = per_token - entropy_coef * entropy
    k3 = torch.zeros_like(per_token)
    if with_kl:
        rho = torch.exp(torch.clamp(ref_logps.double() - logp, -c, c))
        k3 = rho - torch.log(rho) - 1
        if unbiased_kl:  # importance-weighted k3: E_old[r k3] is the KL under the current policy
            k3 = ratio * k3
        per_token = per_token + beta * k3
    seq_sums = (per_token * mask).sum(dim=-1)  # [B]

    total = seq_sums.sum()
    n_tok = torch.clamp(n.sum(), min=1.0)
    if loss_type == "grpo":  # each sequence's token mean, then the mean over sequences
        loss = (seq_sums / torch.clamp(n, min=1.0)).sum() / B
    elif loss_type == "bnpo":  # the token mean over the batch
        loss = total / n_tok
    elif loss_type == "dr_grpo":  # a constant normaliser: batch x the longest allowed completion
        loss = total / (B * (max_completion_length or T))
    elif loss_type == "dapo":  # the global token count (across micro-batches and ranks when given)
        loss = total / (n_tok if num_items_in_batch is None else num_items_in_batch / num_processes)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    low = (((ratio < 1 - epsilon_low) & (adv < 0)).double() * mask).sum()
    high = (((ratio > 1 + epsilon_high) & (adv > 0)).double() * mask).sum()
    metrics = {
        "kl": (k3 * mask).sum() / n_tok,
        "clip_ratio_low": low / n_tok,
        "clip_ratio_high": high / n_tok,
        "clip_ratio": (low + high) / n_tok,
        "entropy": (entropy * mask).sum() / n_tok,
    }
    return loss, metrics
