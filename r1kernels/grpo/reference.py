"""Plain PyTorch GRPO in float64 on full logits: the truth the fused kernels are tested against.

Written from the formulas, independently of ``loss.py`` so that a formula wrong in one is caught by the other:
one sequence at a time, the log-softmax written out, the clipped surrogate in PPO's case form (by the sign of
the advantage), the k3 KL as ``rho - log(rho) - 1``, and every aggregation spelled out per loss type
(DeepSeekMath eq. 3; TRL's GRPOTrainer for the loss types and clip metrics; GSPO for the sequence ratio).
"""

from __future__ import annotations

import torch


def _row_logprobs(h, weight, ids, bias, temperature):
    """float64 (logp [T], entropy [T]) of one sequence's rows ``h [T, H]``."""
    z = h.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z / temperature
    m = z.max(dim=-1, keepdim=True).values.detach()
    lse = m + torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True))
    log_p = z - lse
    logp = log_p[torch.arange(z.shape[0]), ids.long()]
    entropy = -(torch.exp(log_p) * log_p).sum(dim=-1)
    return logp, entropy


def token_logprobs(hidden, weight, token_ids, bias=None, temperature: float = 1.0):
    """(logp, entropy) of ``token_ids`` under ``softmax((hidden @ weight.T + bias) / temperature)``, float64.
    ``hidden [B, T, H]`` is computed one sequence at a time; ``hidden [..., H]`` of any other rank at once."""
    if hidden.dim() == 3:
        pairs = [_row_logprobs(hidden[b], weight, token_ids[b], bias, temperature) for b in range(hidden.shape[0])]
        return torch.stack([logp for logp, _ in pairs]), torch.stack([ent for _, ent in pairs])
    lead = hidden.shape[:-1]
    logp, entropy = _row_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, token_ids.reshape(-1), bias,
                                  temperature)  # fmt: skip
    return logp.view(lead), entropy.view(lead)


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

    seq_sums, seq_counts = [], []  # per sequence: sum of masked per-token losses, completion tokens
    kl_sum = low = high = entropy_sum = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        m, lp = mask[b], logp[b]
        adv = advantages[b].double() if advantages.dim() == 2 else advantages[b].double().expand(T)
        n = m.sum()
        if old_logps is None:
            log_ratio = torch.clamp(lp - lp.detach(), -c, c)  # on-policy: ratio 1, gradient of logp
        else:
            log_ratio = torch.clamp(lp - old_logps[b].double(), -c, c)
        if importance_sampling_level != "token":
            seq_log_ratio = (log_ratio * m).sum() / torch.clamp(n, min=1.0)  # GSPO: the length-normalised ratio
            if importance_sampling_level == "sequence":
                log_ratio = seq_log_ratio.expand(T)
            else:  # GSPO-token: the sequence ratio's value, each token's own gradient
                log_ratio = seq_log_ratio.detach() + lp - lp.detach()
        ratio = torch.exp(log_ratio)
        capped = ratio if delta is None else torch.clamp(ratio, max=delta)
        per_token = -_surrogate(ratio, capped, adv, epsilon_low, epsilon_high)
        if rollout_is_ratio is not None:
            per_token = per_token * rollout_is_ratio[b].double()
        per_token = per_token - entropy_coef * entropy[b]
        if with_kl:
            rho = torch.exp(torch.clamp(ref_logps[b].double() - lp, -c, c))
            k3 = rho - torch.log(rho) - 1
            per_token = per_token + beta * k3
            kl_sum = kl_sum + (k3 * m).sum()
        seq_sums.append((per_token * m).sum())
        seq_counts.append(n)
        low = low + (((ratio < 1 - epsilon_low) & (adv < 0)).double() * m).sum()
        high = high + (((ratio > 1 + epsilon_high) & (adv > 0)).double() * m).sum()
        entropy_sum = entropy_sum + (entropy[b] * m).sum()

    total = sum(seq_sums)
    n_tok = torch.clamp(sum(seq_counts), min=1.0)
    if loss_type == "grpo":  # each sequence's token mean, then the mean over sequences
        loss = sum(s / torch.clamp(n, min=1.0) for s, n in zip(seq_sums, seq_counts, strict=True)) / B
    elif loss_type == "bnpo":  # the token mean over the batch
        loss = total / n_tok
    elif loss_type == "dr_grpo":  # a constant normaliser: batch x the longest allowed completion
        loss = total / (B * (max_completion_length or T))
    elif loss_type == "dapo":  # the global token count (across micro-batches and ranks when given)
        loss = total / (n_tok if num_items_in_batch is None else num_items_in_batch / num_processes)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    metrics = {
        "kl": kl_sum / n_tok,
        "clip_ratio_low": low / n_tok,
        "clip_ratio_high": high / n_tok,
        "clip_ratio": (low + high) / n_tok,
        "entropy": entropy_sum / n_tok,
    }
    return loss, metrics
