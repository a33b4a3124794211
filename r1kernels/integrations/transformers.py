"""HF transformers' DeepSeek-V3 on r1kernels ops, with one call.

    from r1kernels.integrations.transformers import apply_r1kernels_to_deepseek_v3

    apply_r1kernels_to_deepseek_v3(model)              # a DeepseekV3ForCausalLM / DeepseekV3Model instance
    apply_r1kernels_to_deepseek_v3()                   # or the classes, before the model is built

What each switch replaces (parameters, buffers, module names, hooks and the KV cache stay HF's):

- ``moe``: ``DeepseekV3TopkRouter.forward`` -> ``r1kernels.moe.route`` (C++ / CUDA C++ selection, fp32 logits
  as HF computes them); the experts -> ``r1kernels.moe.routed_experts`` (permutation, grouped GEMMs, SwiGLU and
  the weighted combine in our kernels), registered in transformers' experts interface as ``"r1kernels"`` (and
  ``"r1kernels_fp8"``), so ``DeepseekV3Config(experts_implementation="r1kernels")`` or
  ``model.set_experts_implementation("r1kernels")`` also select it, beside ``grouped_mm`` and ``deepgemm``.
- ``attention``: ``DeepseekV3Attention.forward`` computes the attention core with ``r1kernels.mla.mla_attention``
  (the rope key stays one per position, never broadcast over heads) when transformers dropped the mask
  (causal without padding, sdpa / flash implementations) or passes packed offsets (``cu_seq_lens_q``, batch
  1), on the prefill (an empty cache) or without a cache; the compressed latents go into HF's cache exactly as
  HF stores them. Any other call (a padding mask, a decode step over a filled cache, attention dropout in
  training) runs HF's own forward.
- ``fp8_linear``: the linears DeepSeek-V3's recipe runs in FP8 (attention projections, dense and shared-expert
  MLPs) become ``r1kernels.fp8.FP8Linear`` (1 x 128 activation and 128 x 128 weight scales, FP8 forward, input
  and weight gradients; master weights unchanged), and the routed experts use ``"r1kernels_fp8"``. Embeddings,
  the LM head, norms and the router stay in their dtype. Linears whose features are not multiples of 16 stay.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from r1kernels.fp8.linear import FEATURE_ALIGN, FP8Linear
from r1kernels.mla.attention import mla_attention
from r1kernels.moe.layer import routed_experts
from r1kernels.moe.route import route

EXPERTS = "r1kernels"
EXPERTS_FP8 = "r1kernels_fp8"
FP8_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
               "up_proj", "down_proj")  # fmt: skip
_ORIGINAL: dict[str, object] = {}  # HF's class attributes, saved once before the first class patch


def _modeling():
    try:
        from transformers.models.deepseek_v3 import modeling_deepseek_v3
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise ImportError(
            "r1kernels.integrations.transformers needs transformers>=5.24: pip install r1kernels[hf]"
        ) from e
    return modeling_deepseek_v3


def router_forward(self, hidden_states: torch.Tensor):
    """``DeepseekV3TopkRouter.forward`` on ``r1kernels.moe.route``: (fp32 logits [T, E], weights [T, k] fp32,
    expert ids [T, k] int64, HF's dtype)."""
    logits = F.linear(hidden_states.reshape(-1, self.hidden_dim).float(), self.weight.float())
    weights, ids = route(logits, self.e_score_correction_bias, top_k=self.top_k, n_group=self.num_group,
                         topk_group=self.topk_group, routed_scaling_factor=self.routed_scaling_factor,
                         norm_topk_prob=self.norm_topk_prob)  # fmt: skip
    return logits, weights, ids.long()


def _experts(self, hidden_states, top_k_index, top_k_weights, fp8: bool):
    act = getattr(self.config, "hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"the r1kernels experts implement SwiGLU (hidden_act='silu'), got {act!r}")
    ids = top_k_index.to(torch.int32)
    ids = torch.where(ids >= self.gate_up_proj.shape[0], -1, ids)  # HF's "not on this rank" marker -> no expert
    out = routed_experts(hidden_states, top_k_weights.float(), ids, self.gate_up_proj, self.down_proj, fp8=fp8)
    return out.to(hidden_states.dtype)


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The ``"r1kernels"`` experts implementation: ``hidden_states [T, H]``, ``top_k_index [T, k]``,
    ``top_k_weights [T, k]`` -> ``[T, H]``, for ``DeepseekV3Experts`` (``gate_up_proj [E, 2I, H]``,
    ``down_proj [E, H, I]``)."""
    return _experts(self, hidden_states, top_k_index, top_k_weights, fp8=False)


def experts_forward_fp8(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The ``"r1kernels_fp8"`` experts implementation: as ``experts_forward`` with the grouped GEMMs in FP8."""
    return _experts(self, hidden_states, top_k_index, top_k_weights, fp8=True)


def _prefill(cache, layer_idx: int) -> bool:
    try:
        return cache is None or cache.get_seq_length(layer_idx) == 0
    except (AttributeError, TypeError, IndexError):  # a cache without per-layer lengths: HF's path
        return False


def _packed_offsets(attention_mask, batch: int, kwargs: dict):
    """None: dense causal. A tensor: packed offsets. False: a mask r1kernels does not take (HF's path)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if attention_mask is not None:
        return False
    if cu_q is None:
        return None
    if batch != 1 or cu_k is None or (cu_k is not cu_q and not torch.equal(cu_q, cu_k)):
        return False
    return cu_q.to(torch.int32)


def attention_forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                      attention_mask: torch.Tensor | None, cache=None, **kwargs):  # fmt: skip
    """``DeepseekV3Attention.forward`` with the attention core in ``mla_attention`` where it applies (see the
    module docstring); HF's own forward otherwise. Returns (output [B, S, hidden], None)."""
    if "past_key_values" in kwargs:  # the name transformers deprecates, still accepted
        cache = kwargs.pop("past_key_values")
    B, S = hidden_states.shape[:-1]
    cu_seqlens = _packed_offsets(attention_mask, B, kwargs)
    dropout = self.training and self.attention_dropout > 0
    if cu_seqlens is False or dropout or not _prefill(cache, self.layer_idx):
        return _ORIGINAL_ATTENTION(self)(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
    m = _modeling()
    if self.q_lora_rank is None:
        q = self.q_proj(hidden_states)
    else:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    q = q.view(B, S, -1, self.qk_head_dim).transpose(1, 2)
    q_nope, q_rot = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
    latent, k_rot = torch.split(self.kv_a_proj_with_mqa(hidden_states), [self.kv_lora_rank, self.qk_rope_head_dim],
                                dim=-1)  # fmt: skip
    latent = self.kv_a_layernorm(latent).view(B, 1, S, self.kv_lora_rank)
    k_rot = k_rot.view(B, 1, S, self.qk_rope_head_dim)
    cos, sin = position_embeddings
    rope = m.apply_rotary_pos_emb_interleave if self.config.rope_interleave else m.apply_rotary_pos_emb
    q_rot, k_rot = rope(q_rot, k_rot, cos, sin)
    if cache is not None:  # the latents, as HF caches them
        latent, k_rot = cache.update(latent, k_rot, self.layer_idx, kwargs=kwargs)
    kv = self.kv_b_proj(latent[:, 0]).view(B, S, -1, self.qk_nope_head_dim + self.v_head_dim)
    k_nope, v = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
    query = torch.cat([q_nope, q_rot], dim=-1).transpose(1, 2).contiguous()
    out, _ = mla_attention(query, k_nope.contiguous(), k_rot[:, 0].contiguous(), v.contiguous(), causal=True,
                           softmax_scale=self.scaling, cu_seqlens=cu_seqlens)  # fmt: skip
    return self.o_proj(out.to(hidden_states.dtype).reshape(B, S, -1)), None


def _ORIGINAL_ATTENTION(module):
    """HF's forward for this module, however it was patched (instance or class)."""
    original = _ORIGINAL.get("attention") or _modeling().DeepseekV3Attention.forward
    return types.MethodType(original, module)


def _register_experts() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS, experts_forward)
    ExpertsInterface.register(EXPERTS_FP8, experts_forward_fp8)


def _to_fp8(linear: nn.Linear) -> bool:
    """Turn an ``nn.Linear`` into an ``FP8Linear`` in place (same parameters); False if its shape does not fit."""
    if isinstance(linear, FP8Linear):
        return True
    if type(linear) is not nn.Linear or linear.in_features % FEATURE_ALIGN or linear.out_features % FEATURE_ALIGN:
        return False
    linear.__class__ = FP8Linear
    linear._qweight, linear._qweight_key = None, None
    return True


def _fp8_linears(layer: nn.Module) -> list[str]:
    """Convert a decoder layer's recipe linears; returns the names that stayed in their dtype."""
    skipped = []
    for name, module in layer.named_modules():
        if name.rsplit(".", 1)[-1] in FP8_LINEARS and isinstance(module, nn.Linear) and not _to_fp8(module):
            skipped.append(name)
    return skipped


def _class_targets(m) -> dict[str, tuple[type, str]]:
    return {
        "attention": (m.DeepseekV3Attention, "forward"),
        "router": (m.DeepseekV3TopkRouter, "forward"),
        "experts": (m.DeepseekV3Experts, "forward"),
        "layer_init": (m.DeepseekV3DecoderLayer, "__init__"),
    }


def _patch_classes(m, attention: bool, moe: bool, fp8_linear: bool) -> None:
    for key, (owner, attr) in _class_targets(m).items():
        _ORIGINAL.setdefault(key, getattr(owner, attr))
    if attention:
        m.DeepseekV3Attention.forward = attention_forward
    if moe:
        m.DeepseekV3TopkRouter.forward = router_forward
        m.DeepseekV3Experts.forward = experts_forward_fp8 if fp8_linear else experts_forward
    if fp8_linear:
        original_init = _ORIGINAL["layer_init"]

        def __init__(self, config, layer_idx):
            original_init(self, config, layer_idx)
            _fp8_linears(self)

        m.DeepseekV3DecoderLayer.__init__ = __init__


def apply_r1kernels_to_deepseek_v3(model: nn.Module | None = None, *, attention: bool = True, moe: bool = True,
                                   fp8_linear: bool = False) -> list[str]:  # fmt: skip
    """Run transformers' DeepSeek-V3 on r1kernels ops (see the module docstring for what each switch replaces).

    Args:
        model: a built ``DeepseekV3ForCausalLM`` / ``DeepseekV3Model`` (or any module holding DeepSeek-V3
            decoder layers): its modules are patched in place. None: the classes are patched, so every model
            built afterwards uses r1kernels.
        attention / moe / fp8_linear: which parts to replace.

    Returns the names of linears left out of FP8 because their feature counts are not multiples of 16 (empty
    unless ``fp8_linear``; always empty for class patching, where layers convert as they are built). Calling it
    again is harmless. Raises TypeError when ``model`` holds no DeepSeek-V3 decoder layer.
    """
    m = _modeling()
    _register_experts()
    if model is None:
        _patch_classes(m, attention, moe, fp8_linear)
        return []
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers DeepSeek-V3 model (an nn.Module), got {type(model).__name__}")
    layers = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, m.DeepseekV3DecoderLayer)]
    if not layers:
        raise TypeError(f"model must hold DeepseekV3DecoderLayer modules (a DeepseekV3ForCausalLM / DeepseekV3Model),"
                        f" got {type(model).__name__}")  # fmt: skip
    skipped = []
    for prefix, layer in layers:
        if attention:
            layer.self_attn.forward = types.MethodType(attention_forward, layer.self_attn)
        if moe and isinstance(layer.mlp, m.DeepseekV3MoE):
            layer.mlp.gate.forward = types.MethodType(router_forward, layer.mlp.gate)
        if fp8_linear:
            skipped += [f"{prefix}.{name}" for name in _fp8_linears(layer)]
    if moe:
        implementation = EXPERTS_FP8 if fp8_linear else EXPERTS
        setter = getattr(model, "set_experts_implementation", None)
        if setter is not None:
            setter(implementation)
        else:
            for _, layer in layers:
                layer.mlp.config._experts_implementation = implementation
    return skipped


def revert_r1kernels_deepseek_v3() -> None:
    """Undo a class patch (``apply_r1kernels_to_deepseek_v3()`` without a model): HF's forwards come back for
    models built afterwards. Patched instances keep their r1kernels forwards."""
    for key, (owner, attr) in _class_targets(_modeling()).items():
        if key in _ORIGINAL:
            setattr(owner, attr, _ORIGINAL[key])
