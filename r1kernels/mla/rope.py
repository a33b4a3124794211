"""DeepSeek-V3's rotary position embedding for the rope part of MLA: plain or YaRN frequencies, and the
rotation of interleaved pairs (DeepSeek's checkpoint layout) or of halves."""

from __future__ import annotations

import math

import torch


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim / 2] fp32, cos / sin scale). ``scaling``: None, or YaRN's parameters
    (``{"rope_type": "yarn", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
    "mscale_all_dim"}``, DeepSeek-V3's config): frequencies blended between interpolated and extrapolated by a
    linear ramp over the correction range, and the attention factor mscale(factor, mscale) /
    mscale(factor, mscale_all_dim)."""
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if not scaling or scaling.get("rope_type", "default") == "default":
        return 1.0 / pos_freqs, 1.0
    factor = scaling["factor"]
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all else (
            yarn_mscale(factor))  # fmt: skip
    original = scaling["original_max_position_embeddings"]

    def correction_dim(rotations):  # the dimension whose wavelength makes `rotations` turns over `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scale: float, dtype: torch.dtype):
    """cos, sin ``[*positions.shape, dim / 2]`` (one angle per rotated pair), in ``dtype``."""
    angles = positions[..., None].float() * inv_freq.to(positions.device)
    return (angles.cos() * attention_scale).to(dtype), (angles.sin() * attention_scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate the last dim of ``x [..., S, (heads,) dim]`` by angles ``cos / sin [..., S, dim / 2]`` broadcast
    over any head dims between. interleave: pairs (x0, x1), (x2, x3), ... (DeepSeek's weights; the output
    lists the rotated first members, then the second ones); else pairs (x_i, x_{i + dim/2})."""
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    a, b = (x[..., 0::2], x[..., 1::2]) if interleave else x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
