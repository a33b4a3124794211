"""The DeepSeek-V3 MoE layer: router, routed SwiGLU experts over the expert-sorted rows, shared expert.
Parameter names and shapes are HF transformers' ``DeepseekV3MoE``'s, so its state dict loads as it is."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1kernels.moe import expert_parallel, reference
from r1kernels.moe.balance import tokens_per_expert
from r1kernels.moe.fp8_grouped_linear import SEGMENT as FP8_SEGMENT
from r1kernels.moe.fp8_grouped_linear import fp8_grouped_linear
from r1kernels.moe.grouped_linear import grouped_linear, segment_alignment
from r1kernels.moe.permutation import permutation_index
from r1kernels.moe.permute import moe_permute
from r1kernels.moe.route import route
from r1kernels.moe.swiglu import swiglu
from r1kernels.moe.unpermute import moe_unpermute
from r1kernels.reference_mode import use_reference


class TopkRouter(nn.Module):
    """``gate``: fp32 logits ``hidden @ weight.T``, then ``route``. ``e_score_correction_bias`` is a buffer,
    moved by ``update_correction_bias`` (no gradient)."""

    def __init__(self, hidden_size, n_routed_experts, top_k, n_group, topk_group, routed_scaling_factor,
                 norm_topk_prob, device=None):  # fmt: skip
        super().__init__()
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.routed_scaling_factor, self.norm_topk_prob = routed_scaling_factor, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(n_routed_experts, hidden_size, dtype=torch.float32, device=device))
        self.register_buffer("e_score_correction_bias", torch.zeros(n_routed_experts, device=device))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor):
        """x ``[T, H]`` -> (logits ``[T, E]`` fp32, weights ``[T, k]`` fp32, expert ids ``[T, k]`` int32)."""
        logits = F.linear(x.float(), self.weight)
        kw = dict(top_k=self.top_k, n_group=self.n_group, topk_group=self.topk_group,
                  routed_scaling_factor=self.routed_scaling_factor, norm_topk_prob=self.norm_topk_prob)  # fmt: skip
        if use_reference():
            weights, ids = reference.route(logits, self.e_score_correction_bias, **kw)
            return logits, weights, ids.to(torch.int32)
        weights, ids = route(logits, self.e_score_correction_bias, **kw)
        return logits, weights, ids


def routed_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up_proj: torch.Tensor,
                   down_proj: torch.Tensor, *, fp8: bool = False) -> torch.Tensor:  # fmt: skip
    """SwiGLU experts over expert-sorted rows: ``sum_j weights[t, j] * expert_{ids[t, j]}(x[t])``.

    x ``[T, H]``; routing ``weights [T, k]`` float32 and ``ids [T, k]`` int32 / int64 (-1: no expert);
    ``gate_up_proj [E, 2I, H]`` (gate rows first, then up), ``down_proj [E, H, I]`` in x's dtype. Returns
    ``[T, H]`` in x's dtype. ``fp8``: the three GEMMs of each projection in FP8 (``fp8_grouped_linear``).
    Under ``reference_ops()`` the float64 reference.
    """
    if use_reference():
        return reference.routed_experts(x, weights, ids, gate_up_proj, down_proj, fp8=fp8).to(x.dtype)
    align = FP8_SEGMENT if fp8 else segment_alignment(x.device)
    index = permutation_index(ids.to(torch.int32).contiguous(), gate_up_proj.shape[0], align=align)
    rows = moe_permute(x, index)
    linear = fp8_grouped_linear if fp8 else grouped_linear
    out = linear(swiglu(linear(rows, gate_up_proj, index)), down_proj, index)
    return moe_unpermute(out, index, weights)


class RoutedExperts(nn.Module):
    """``experts``: ``gate_up_proj [E, 2I, H]`` (gate rows first, then up) and ``down_proj [E, H, I]``."""

    def __init__(self, n_routed_experts, hidden_size, intermediate_size, device=None, dtype=None, fp8=False):
        super().__init__()
        self.fp8 = fp8
        kw = dict(device=device, dtype=dtype)
        self.gate_up_proj = nn.Parameter(torch.empty(n_routed_experts, 2 * intermediate_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(n_routed_experts, hidden_size, intermediate_size, **kw))
        for w in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(w, std=w.shape[-1] ** -0.5)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x ``[T, H]``, routing weights / ids ``[T, k]`` -> ``sum_j weights[t, j] * expert_{ids[t, j]}(x[t])``."""
        return routed_experts(x, weights, ids, self.gate_up_proj, self.down_proj, fp8=self.fp8)


class SwiGLU(nn.Module):
    """``shared_experts``: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, hidden_size, intermediate_size, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """DeepSeek-V3's MoE block (HF ``DeepseekV3MoE``): ``experts(x; route(gate(x))) + shared_experts(x)``.

    Keywords are ``DeepseekV3Config``'s field names. Submodules and parameters: ``gate.weight [E, H]`` fp32,
    ``gate.e_score_correction_bias [E]`` (buffer), ``experts.gate_up_proj [E, 2I, H]``,
    ``experts.down_proj [E, H, I]``, ``shared_experts.{gate,up,down}_proj.weight`` (intermediate
    ``I * n_shared_experts``), so ``load_state_dict(hf_moe.state_dict())`` works.

    ``fp8=True``: the routed experts' forward, input-gradient and weight-gradient GEMMs run in FP8
    (``fp8_grouped_linear``: DeepSeek-V3's recipe, 1 x 128 activations, 128 x 128 weights, segments aligned
    to 128 rows); the router, the SwiGLU and the shared expert stay in the layer's dtype.

    Expert parallelism: with ``ep_group`` (a ``torch.distributed`` group of W ranks) this rank holds experts
    ``[rank * E / W, (rank + 1) * E / W)`` only (``experts.*`` have E / W rows; ``shard_state_dict`` cuts a full
    state dict), and each forward dispatches its tokens to the experts' ranks and combines the results
    (``expert_parallel``): outputs and gradients equal a single process's. The router and the shared expert
    stay replicated (all-reduce their gradients as for data parallelism).

    Forward: ``hidden [..., H]`` -> same shape and dtype. The router runs in fp32 (``route``, CUDA C++ / C++),
    tokens move to expert-sorted rows (``permutation_index`` + ``moe_permute``), the experts are grouped GEMMs
    (``grouped_linear``), and ``moe_unpermute`` sums each token's k outputs with its routing weights. Every
    piece has its own backward: gradients reach the experts, the shared expert, the hidden states and, through
    the routing weights, ``gate.weight``. ``last_tokens_per_expert`` holds the last forward's counts (on the
    device) for ``update_correction_bias``.
    """

    def __init__(self, hidden_size: int, moe_intermediate_size: int, n_routed_experts: int,
                 n_shared_experts: int = 1, num_experts_per_tok: int = 8, n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0, norm_topk_prob: bool = True, *, fp8: bool = False,
                 ep_group=None, device=None, dtype=None):  # fmt: skip
        super().__init__()
        self.ep_group = ep_group
        self.n_routed_experts = n_routed_experts
        local_experts = n_routed_experts
        if ep_group is not None:
            local_experts = expert_parallel.experts_per_rank(n_routed_experts, ep_group)
        self.gate = TopkRouter(hidden_size, n_routed_experts, num_experts_per_tok, n_group, topk_group,
                               routed_scaling_factor, norm_topk_prob, device=device)  # fmt: skip
        self.experts = RoutedExperts(local_experts, hidden_size, moe_intermediate_size, device=device, dtype=dtype,
                                     fp8=fp8)  # fmt: skip
        self.shared_experts = SwiGLU(hidden_size, moe_intermediate_size * n_shared_experts, device=device, dtype=dtype)
        self.last_tokens_per_expert: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        _, weights, ids = self.gate(x)
        self.last_tokens_per_expert = tokens_per_expert(ids, self.n_routed_experts)
        x = x.contiguous()
        if self.ep_group is None:
            routed = self.experts(x, weights, ids)
        else:
            rows, local_ids, dispatched = expert_parallel.dispatch(x, ids, self.n_routed_experts, self.ep_group)
            ones = torch.ones(rows.shape[0], 1, device=rows.device)
            out = self.experts(rows, ones, local_ids[:, None])
            routed = expert_parallel.combine(out, dispatched, weights, self.ep_group)
        return (routed + self.shared_experts(x)).view(hidden.shape)

    @staticmethod
    def shard_state_dict(state_dict: dict, rank: int, world: int) -> dict:
        """A full (single-process or HF) state dict cut to rank's experts for ``MoE(..., ep_group=...)``: every
        ``experts.gate_up_proj`` / ``experts.down_proj`` in it (one MoE layer's, or a whole model's)."""
        out = dict(state_dict)
        for name, full in state_dict.items():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                per_rank = full.shape[0] // world
                out[name] = full[rank * per_rank : (rank + 1) * per_rank].clone()
        return out
