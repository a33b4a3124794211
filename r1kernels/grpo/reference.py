"""Plain PyTorch GRPO on full logits, in float64: the truth the fused kernels are tested against.

Written from the formulas (DeepSeekMath eq. 3; TRL's GRPOTrainer for the loss types, GSPO's sequence-level
ratio and the two-sided clip ``delta``), on padded ``[B, T]`` tensors, materialising ``[B, T, V]`` logits.
"""

from __future__ import annotations

import torch


def token_logprobs(hidden, weight, token_ids, bias=None, temperature: float = 1.0):
    """(logp, entropy) of ``token_ids`` under ``softmax((hidden @ weight.T + bias) / temperature)``, float64."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logits = logits / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4):
    r = rewards.double().view(-1, group_size)
    centred = (r - r.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        return centred / (r.std(dim=1).repeat_interleave(group_size) + eps)
    if scale == "batch":
        return centred / (rewards.double().std() + eps)
    return centred


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
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = completion_mask.double()
    logp, entropy = token_logprobs(hidden, weight, token_ids, bias, temperature)
    adv = advantages.double()
    adv = adv.unsqueeze(1).expand_as(logp) if adv.dim() == 1 else adv
    old = logp.detach() if old_logps is None else old_logps.double()
    log_ratio = torch.clamp(logp - old, -log_ratio_clamp, log_ratio_clamp)
    if importance_sampling_level in ("sequence", "sequence_token"):
        seq = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(logp)
        log_ratio = seq if importance_sampling_level == "sequence" else seq.detach() + logp - logp.detach()
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token = -torch.minimum(unclipped * adv, clipped * adv)
    if rollout_is_ratio is not None:
        per_token = per_token * rollout_is_ratio.double()
    per_token = per_token - entropy_coef * entropy
    kl = None
    if ref_logps is not None and beta != 0.0:
        d = torch.clamp(ref_logps.double() - logp, -log_ratio_clamp, log_ratio_clamp)
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    B, T = logp.shape
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (B * (max_completion_length or T))
    elif loss_type == "dapo":
        normaliser = mask.sum() if num_items_in_batch is None else num_items_in_batch / num_processes
        loss = (per_token * mask).sum() / normaliser
    else:
        raise ValueError(loss_type)
    n_tok = mask.sum().clamp(min=1.0)
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).double()
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).double()
    metrics = {
        "kl": (kl * mask).sum() / n_tok if kl is not None else torch.zeros((), dtype=torch.float64),
        "clip_ratio_low": (low * mask).sum() / n_tok,
        "clip_ratio_high": (high * mask).sum() / n_tok,
        "clip_ratio": ((low + high) * mask).sum() / n_tok,
        "entropy": (entropy * mask).sum() / n_tok,
    }
    return loss, metrics
