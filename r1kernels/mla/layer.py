"""DeepSeek-V3's attention block (HF transformers' ``DeepseekV3Attention`` parameter names and shapes): q LoRA
(or a plain q projection), the compressed kv latent with RMSNorm, rope on a shared key; a training path on
``mla_attention`` and an absorbed decode path on ``mla_decode`` over a paged latent cache."""

from __future__ import annotations

import torch
from torch import nn

from r1kernels.mla import reference
from r1kernels.mla.attention import mla_attention
from r1kernels.mla.decode import append_to_cache, mla_decode
from r1kernels.mla.rope import apply_rope, rope_cos_sin, rope_frequencies, yarn_mscale
from r1kernels.reference_mode import use_reference


class RMSNorm(nn.Module):
    """HF's ``DeepseekV3RMSNorm``: normalised in fp32, cast back, then scaled."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class AttentionCore(nn.Module):
    """The attention core of the training path as a module of its own (no parameters, so no state-dict entry):
    ``(q [B, S, h, dn + dr], k_nope [B, S, h, dn], k_pe [B, S, dr], v [B, S, h, dv], cu_seqlens or None,
    max_seqlen or None)`` -> ``out [B, S, h, dv]`` in q's dtype, causal, through ``mla_attention`` (the float64
    reference under ``reference_ops()``). Being a module lets whole-model validation check it on its own inputs."""

    def __init__(self, softmax_scale: float):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, q, k_nope, k_pe, v, cu_seqlens=None, max_seqlen=None) -> torch.Tensor:
        if use_reference():
            out, _ = reference.mla_attention(q, k_nope, k_pe, v, causal=True, softmax_scale=self.softmax_scale,
                                             cu_seqlens=cu_seqlens)  # fmt: skip
        else:
            out, _ = mla_attention(q, k_nope, k_pe, v, causal=True, softmax_scale=self.softmax_scale,
                                   cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)  # fmt: skip
        return out.to(q.dtype)

    def extra_repr(self) -> str:
        return f"softmax_scale={self.softmax_scale:g}"


class MLA(nn.Module):
    """Multi-head latent attention, keywords named like ``DeepseekV3Config``'s fields.

    Submodules: ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj`` (or ``q_proj`` when ``q_lora_rank`` is None),
    ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``: HF's, so its state dict loads as is.
    ``rope_scaling``: None or YaRN's parameters (see ``rope_frequencies``); the softmax scale gets YaRN's
    ``mscale(factor, mscale_all_dim) ** 2`` as DeepSeek's does.

    ``forward(hidden [B, S, H], positions [B, S] = arange, cu_seqlens=None, max_seqlen=None)``: the training path,
    full heads from the latent, ``mla_attention`` (causal; max_seqlen as there: no host sync for packed input).
    ``decode(hidden [B, s_q, H], positions, kv_cache, block_table, cache_seqlens)``: appends the new tokens'
    latents ``[normalised c_kv | roped k_pe]`` to the paged cache and attends with ``W_UK`` absorbed into the
    query and ``W_UV`` into the output (``mla_decode``; needs
    kv_lora_rank 512 and qk_rope_head_dim 64, DeepSeek-V3's); returns (output, new cache_seqlens). Over the
    same tokens the two paths give the same outputs.
    """

    def __init__(self, hidden_size: int, num_attention_heads: int, q_lora_rank: int | None, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, *, rope_theta: float = 10000.0,
                 rope_scaling: dict | None = None, rope_interleave: bool = True, attention_bias: bool = False,
                 rms_norm_eps: float = 1e-6, device=None, dtype=None):  # fmt: skip
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.num_heads, self.kv_lora_rank = num_attention_heads, kv_lora_rank
        self.dn, self.dr, self.dv = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        qk = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, num_attention_heads * qk, bias=False, **kw)
        else:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=attention_bias, **kw)
            self.q_a_layernorm = RMSNorm(q_lora_rank, rms_norm_eps, **kw)
            self.q_b_proj = nn.Linear(q_lora_rank, num_attention_heads * qk, bias=False, **kw)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=attention_bias, **kw)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, rms_norm_eps, **kw)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_attention_heads * (qk_nope_head_dim + v_head_dim), bias=False,
                                   **kw)  # fmt: skip
        self.o_proj = nn.Linear(num_attention_heads * v_head_dim, hidden_size, bias=attention_bias, **kw)
        self.rope_interleave = rope_interleave
        inv_freq, self.rope_scale = rope_frequencies(qk_rope_head_dim, rope_theta, rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.softmax_scale = qk**-0.5
        if rope_scaling and rope_scaling.get("rope_type", "default") != "default" and rope_scaling.get(
                "mscale_all_dim"):  # fmt: skip
            self.softmax_scale *= yarn_mscale(rope_scaling["factor"], rope_scaling["mscale_all_dim"]) ** 2
        self.attention = AttentionCore(self.softmax_scale)

    def _project(self, hidden, positions):
        """(q_nope [B, S, h, dn], q_rot [B, S, h, dr], latent [B, S, kv_lora_rank], k_rot [B, S, dr])."""
        B, S, _ = hidden.shape
        q = self.q_proj(hidden) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = q.view(B, S, self.num_heads, self.dn + self.dr)
        latent, k_rot = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.dr], dim=-1)
        if positions is None:
            positions = torch.arange(S, device=hidden.device).expand(B, S)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_scale, hidden.dtype)
        q_rot = apply_rope(q[..., self.dn :], cos, sin, self.rope_interleave)
        k_rot = apply_rope(k_rot, cos, sin, self.rope_interleave)
        return q[..., : self.dn], q_rot, self.kv_a_layernorm(latent), k_rot

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:  # fmt: skip
        B, S, _ = hidden.shape
        q_nope, q_rot, latent, k_rot = self._project(hidden, positions)
        kv = self.kv_b_proj(latent).view(B, S, self.num_heads, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        out = self.attention(torch.cat([q_nope, q_rot], -1), k_nope.contiguous(), k_rot.contiguous(), v.contiguous(),
                             cu_seqlens, max_seqlen)  # fmt: skip
        return self.o_proj(out.reshape(B, S, self.num_heads * self.dv))

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [h, dn, kv_lora_rank], W_UV [h, dv, kv_lora_rank]) from kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.dn + self.dv, self.kv_lora_rank)
        return w[:, : self.dn], w[:, self.dn :]

    def decode(self, hidden: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
               cache_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        B, s_q, _ = hidden.shape
        q_nope, q_rot, latent, k_rot = self._project(hidden, positions)
        lengths = append_to_cache(
            kv_cache, block_table, cache_seqlens, torch.cat([latent, k_rot], -1).to(kv_cache.dtype)
        )
        w_uk, w_uv = self.absorbed_weights()
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # W_UK absorbed: scores against the latent
        q_abs = torch.cat([q_latent, q_rot], -1).to(kv_cache.dtype).contiguous()
        out_latent, _ = mla_decode(q_abs, kv_cache, block_table, lengths, softmax_scale=self.softmax_scale)
        out = torch.einsum("bshc,hdc->bshd", out_latent.to(hidden.dtype), w_uv)  # W_UV absorbed on the way out
        return self.o_proj(out.reshape(B, s_q, self.num_heads * self.dv)), lengths
