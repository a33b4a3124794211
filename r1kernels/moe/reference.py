"""Plain PyTorch DeepSeek-V3 MoE pieces in float64: the truth the kernels are tested against."""

from __future__ import annotations

import torch


def route(logits, correction_bias=None, *, top_k, n_group=1, topk_group=1, routed_scaling_factor=1.0,
          norm_topk_prob=True, score_func="sigmoid"):  # fmt: skip
    """(weights [T, k] float64, ids [T, k] int64): experts in descending biased score, ties to the lower id."""
    lg = logits.double()
    scores = torch.sigmoid(lg) if score_func == "sigmoid" else torch.softmax(lg, dim=-1)
    choice = scores + (correction_bias.double() if correction_bias is not None else 0.0)
    T, E = choice.shape
    if n_group > 1:
        grouped = choice.view(T, n_group, E // n_group)
        group_scores = grouped.sort(dim=-1, descending=True).values[..., :2].sum(-1)
        # stable sort on the negated score: equal scores keep ascending group order
        keep = torch.argsort(-group_scores, dim=-1, stable=True)[:, :topk_group]
        mask = torch.zeros(T, n_group, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~mask.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = torch.argsort(-choice, dim=-1, stable=True)[:, :top_k]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids
