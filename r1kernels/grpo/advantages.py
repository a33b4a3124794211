"""Group-normalised advantages for GRPO."""

from __future__ import annotations

import torch

from r1kernels._checks import check_tensor

SCALES = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """``(reward - group mean) / (std + eps)`` per completion, as TRL's GRPOTrainer computes it.

    Args:
        rewards: ``[B]`` float, completions of one prompt adjacent (``B = prompts * group_size``).
        group_size: completions per prompt (G), >= 1 and dividing B.
        scale: ``"group"`` divides by the (unbiased) std within each group, ``"batch"`` by the std over the
            whole batch, ``"none"`` does not scale (Dr. GRPO).
        eps: added to the std; a group whose rewards are all equal gets advantage 0, never NaN.

    Returns:
        ``[B]`` float32 advantages.
    """
    check_tensor("rewards", rewards, ndim=1)
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"rewards must be a floating-point tensor, got {rewards.dtype}")
    if not isinstance(group_size, int) or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"group_size must be a positive int dividing len(rewards) = {rewards.shape[0]}, got {group_size}"
        )
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if rewards.numel() == 0:
        raise ValueError("rewards is empty")
    # float64 for these O(B) statistics: a group of equal rewards then centres to exactly 0
    r = rewards.double().view(-1, group_size)
    centred = (r - r.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred.float()
    # One sample has no spread (its unbiased std is NaN): take std 0, so its advantage is 0, not NaN.
    if scale == "group":
        std = r.std(dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(centred)
    else:
        std = rewards.double().std() if rewards.numel() > 1 else torch.zeros((), dtype=torch.float64)
    return (centred / (std + eps)).float()
