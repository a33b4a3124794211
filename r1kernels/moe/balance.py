"""DeepSeek-V3 load balancing: the auxiliary-loss-free bias update and the sequence-wise balance loss."""

from __future__ import annotations

import torch

from r1kernels._checks import check_tensor


def tokens_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E] int64`` count of routed (token, slot) pairs per expert, from ``expert_ids [..., k]`` (-1: not
    routed). A scatter-add into E + 1 bins, not ``bincount`` (whose output size needs the max id: a host sync)."""
    ids = expert_ids.reshape(-1).long()
    bins = torch.where(ids >= 0, ids, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(0, bins, torch.ones_like(bins))[:num_experts]


@torch.no_grad()
def update_correction_bias(bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free balancing step, in place: each expert's ``e_score_correction_bias``
    moves by ``rate`` toward balance, up for an expert that received fewer tokens than the mean, down for one
    that received more (``bias += rate * sign(mean - load)``; unchanged at exactly the mean).

    Args:
        bias: ``[E]`` float32, the router's correction bias (a buffer, not a parameter).
        tokens_per_expert: ``[E]`` counts of the last step (see ``tokens_per_expert``), any numeric dtype.
        rate: the bias update speed (DeepSeek-V3: 0.001).

    Returns ``bias``. No host synchronisation.
    """
    check_tensor("bias", bias, dtypes=(torch.float32,), ndim=1)
    check_tensor("tokens_per_expert", tokens_per_expert, ndim=1)
    if tokens_per_expert.shape != bias.shape or tokens_per_expert.device != bias.device:
        raise ValueError(f"tokens_per_expert must be {tuple(bias.shape)} on {bias.device}, got "
                         f"{tuple(tokens_per_expert.shape)} on {tokens_per_expert.device}")  # fmt: skip
    load = tokens_per_expert.float()
    return bias.add_(torch.sign(load.mean() - load), alpha=rate)


def sequence_balance_loss(
    logits: torch.Tensor, expert_ids: torch.Tensor, *, top_k: int, alpha: float, score_func: str = "sigmoid"
) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, averaged over sequences:
    ``alpha * sum_i f_i P_i`` with ``f_i = E / (k T) * #{t : token t routed to i}`` and
    ``P_i = mean_t s'_{t,i}``, ``s'`` the scores normalised to sum 1 over the experts.

    Args:
        logits: ``[B, T, E]`` router logits (differentiable: the loss flows through P).
        expert_ids: ``[B, T, k]`` the chosen experts (``route``'s ids), not differentiated.
        top_k: k. alpha: the loss weight (DeepSeek-V3: 0.0001). score_func: as for ``route``.

    Returns a scalar float32.
    """
    check_tensor("logits", logits, dtypes=(torch.float32, torch.bfloat16), ndim=3)
    check_tensor("expert_ids", expert_ids, dtypes=(torch.int32, torch.int64), ndim=3)
    B, T, E = logits.shape
    if tuple(expert_ids.shape) != (B, T, top_k):
        raise ValueError(f"expert_ids must be [B, T, top_k] = {(B, T, top_k)}, got {tuple(expert_ids.shape)}")
    lg = logits.float()
    scores = torch.sigmoid(lg) if score_func == "sigmoid" else torch.softmax(lg, dim=-1)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # [B, E]
    counts = torch.zeros(B, E, device=logits.device).scatter_add_(
        1, expert_ids.reshape(B, -1).long(), torch.ones(B, T * top_k, device=logits.device)
    )
    f = counts * (E / (top_k * T))
    return alpha * (f * p).sum(-1).mean()
