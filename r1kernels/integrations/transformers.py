"""HF transformers' DeepSeek-V3 on r1kernels ops, with one call.

    from r1kernels.integrations.transformers import apply_r1kernels_to_deepseek_v3

    apply_r1kernels_to_deepseek_v3(model)    # a built DeepseekV3ForCausalLM / DeepseekV3Model: patched in place
    apply_r1kernels_to_deepseek_v3()         # or the classes, before the model is built (from_pretrained after)

The HF modules stay: their parameters, buffers, names, hooks, devices and dtypes, and the KV cache. Only
forwards change, so state dicts, PEFT, FSDP wrapping and ``generate`` keep working. What each switch replaces:

- ``moe``: ``DeepseekV3TopkRouter.forward`` selects experts with ``r1kernels.moe.route`` (the logits in fp32,
  as HF computes them); the routed experts run ``r1kernels.moe.routed_experts`` (permutation, grouped GEMMs,
  SwiGLU and the weighted combine in our kernels). The experts are an implementation in transformers' experts
  interface, ``"r1kernels"`` (and ``"r1kernels_fp8"``), registered when this module is imported, so
  ``DeepseekV3Config(experts_implementation="r1kernels")``, ``from_pretrained(...,
  experts_implementation="r1kernels")`` and ``model.set_experts_implementation("r1kernels")`` select them
  beside ``grouped_mm`` and ``deepgemm``. A class patch makes ``"r1kernels"`` the default for models built
  afterwards; a name given explicitly still wins.
- ``attention``: ``DeepseekV3Attention.forward`` computes the attention core with
  ``r1kernels.mla.mla_attention`` (one rope key per position, never broadcast over heads) when
  (1) transformers passes no mask: causal without padding under the sdpa / flash implementations (eager
  always builds a mask), including the prefill of an empty static cache;
  (2) or packed sequences in one row: ``cu_seq_lens_q`` (== ``cu_seq_lens_k``) as flash attention takes them,
  or, under a flash implementation, position ids that restart (as HF's flash path reads them);
  and the call is a prefill (an empty cache) or has no cache, and no attention dropout is active. The
  compressed latents go into HF's cache exactly as HF stores them. Every other call runs HF's own forward:
  a padding or packed-sequence mask (sdpa / eager training on packed position ids builds one), any step over a
  filled cache (decode, chunked prefill), ``attention_dropout > 0`` in training.
- ``fp8_linear``: the linears DeepSeek-V3's recipe runs in FP8 (attention projections, the dense and
  shared-expert MLPs) become ``r1kernels.fp8.FP8Linear`` in place (1 x 128 activation and 128 x 128 weight
  scales; forward, input and weight gradients in FP8; master weights unchanged) and the routed experts use
  ``"r1kernels_fp8"``. Embeddings, the LM head, norms and the router stay in their dtype. A linear whose
  features are not multiples of 16 (``FEATURE_ALIGN``) stays, and so do experts whose ``hidden_size`` or
  ``moe_intermediate_size`` is not (they use ``"r1kernels"``); an instance patch returns their names.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn

from r1kernels.fp8.linear import FEATURE_ALIGN, to_fp8_linear
from r1kernels.mla.attention import mla_attention
from r1kernels.moe.layer import routed_experts
from r1kernels.moe.route import route

EXPERTS = "r1kernels"
EXPERTS_FP8 = "r1kernels_fp8"
FP8_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
               "up_proj", "down_proj")  # fmt: skip
_MISSING = object()
_SAVED: dict[tuple[type, str], object] = {}  # class attributes as HF defined them, saved before a class patch


def _modeling():
    try:
        from transformers.models.deepseek_v3 import modeling_deepseek_v3
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise ImportError(
            "r1kernels.integrations.transformers needs transformers>=5.24: pip install r1kernels[hf]"
        ) from e
    return modeling_deepseek_v3


# ---------------------------------------------------------------------------------------------- router, experts


def router_forward(self, hidden_states: torch.Tensor):
    """``DeepseekV3TopkRouter.forward`` on ``r1kernels.moe.route``: hidden ``[..., H]`` -> (logits ``[T, E]``
    fp32, weights ``[T, k]`` fp32, expert ids ``[T, k]`` int64), as HF returns them."""
    logits = F.linear(hidden_states.reshape(-1, self.hidden_dim).float(), self.weight.float())
    # .float(): a model cast whole with .to(bfloat16) casts this buffer too; HF adds it in fp32 regardless
    bias = self.e_score_correction_bias.float()
    weights, ids = route(logits, bias, top_k=self.top_k, n_group=self.num_group, topk_group=self.topk_group,
                         routed_scaling_factor=self.routed_scaling_factor,
                         norm_topk_prob=self.norm_topk_prob)  # fmt: skip
    return logits, weights, ids.long()


def _fp8_experts_fit(hidden_size: int, intermediate_size: int) -> bool:
    return hidden_size % FEATURE_ALIGN == 0 and intermediate_size % FEATURE_ALIGN == 0


def _experts(self, hidden_states, top_k_index, top_k_weights, fp8: bool):
    act = getattr(self.config, "hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"the r1kernels experts implement SwiGLU (hidden_act='silu'), got {act!r}")
    E, H, I = self.down_proj.shape
    if fp8 and not _fp8_experts_fit(H, I):
        raise ValueError(f"experts_implementation={EXPERTS_FP8!r} needs hidden_size and moe_intermediate_size that "
                         f"are multiples of {FEATURE_ALIGN}, got {H} and {I}: use {EXPERTS!r}")  # fmt: skip
    ids = top_k_index.to(torch.int32)
    # under expert parallelism HF marks experts that live on another rank with ids >= E: no expert here
    ids = torch.where(ids >= E, -1, ids)
    out = routed_experts(hidden_states, top_k_weights.float(), ids, self.gate_up_proj, self.down_proj, fp8=fp8)
    return out.to(hidden_states.dtype)


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The ``"r1kernels"`` experts implementation for ``DeepseekV3Experts`` (``gate_up_proj [E, 2I, H]``,
    ``down_proj [E, H, I]``): ``hidden_states [T, H]``, ``top_k_index [T, k]`` int, ``top_k_weights [T, k]``
    -> ``sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(hidden_states[t])``, ``[T, H]`` in the input's
    dtype."""
    return _experts(self, hidden_states, top_k_index, top_k_weights, fp8=False)


def experts_forward_fp8(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The ``"r1kernels_fp8"`` experts implementation: ``experts_forward`` with the grouped GEMMs (forward and
    both gradients) in FP8. ``hidden_size`` and ``moe_intermediate_size`` must be multiples of 16."""
    return _experts(self, hidden_states, top_k_index, top_k_weights, fp8=True)


def register_experts() -> None:
    """Register ``"r1kernels"`` and ``"r1kernels_fp8"`` in transformers' experts interface (done on import;
    calling it again is harmless)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS, experts_forward)
    ExpertsInterface.register(EXPERTS_FP8, experts_forward_fp8)


# ---------------------------------------------------------------------------------------------- attention


def _is_prefill(cache, layer_idx: int) -> bool:
    try:
        return cache is None or cache.get_seq_length(layer_idx) == 0
    except (AttributeError, TypeError, IndexError):  # a cache without per-layer lengths: HF's path
        return False


def _offsets_from_positions(config, positions, batch: int, seq: int):
    """HF's flash implementations read packed sequences from position ids that restart (sdpa / eager do not):
    their offsets (one host sync, as HF's own check), None for one sequence, False where r1kernels stops."""
    from transformers.utils.generic import is_flash_attention_requested

    if positions is None or batch != 1 or seq == 1 or not is_flash_attention_requested(config):
        return None
    flat = positions.reshape(-1)
    starts = (flat == flat.min()).nonzero().flatten().tolist()
    if starts[0] != 0:
        return False
    if len(starts) == 1:
        return None
    return torch.tensor([*starts, seq], dtype=torch.int32, device=positions.device)


def _attention_layout(self, attention_mask, batch: int, seq: int, kwargs: dict):
    """How ``mla_attention`` takes this call: None (dense causal batch), int32 offsets (packed sequences in one
    row), or False (HF's forward)."""
    if attention_mask is not None:
        return False
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None:
        return _offsets_from_positions(self.config, kwargs.get("position_ids"), batch, seq)
    if batch != 1 or (cu_k is not None and cu_k is not cu_q and not torch.equal(cu_q, cu_k)):
        return False
    return cu_q.to(torch.int32)


def attention_forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                      attention_mask: torch.Tensor | None, cache=None, **kwargs):  # fmt: skip
    """``DeepseekV3Attention.forward`` with the attention core in ``mla_attention`` where it applies (see the
    module docstring), HF's own forward otherwise. hidden ``[B, S, hidden]`` -> (``[B, S, hidden]``, None)."""
    if "past_key_values" in kwargs:  # the name transformers deprecates, still accepted
        cache = kwargs.pop("past_key_values")
    B, S = hidden_states.shape[:-1]
    cu_seqlens = _attention_layout(self, attention_mask, B, S, kwargs)
    dropout = self.training and self.attention_dropout > 0
    if cu_seqlens is False or dropout or not _is_prefill(cache, self.layer_idx):
        return _hf_attention(self)(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
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
    if cache is not None:
        # HF's cache contract: it stores the compressed latents. A prefill attends to exactly the latents just
        # computed, so what update returns is not needed (a static cache returns its whole, mostly empty buffer)
        cache.update(latent, k_rot, self.layer_idx, kwargs=kwargs)
    kv = self.kv_b_proj(latent[:, 0]).view(B, S, -1, self.qk_nope_head_dim + self.v_head_dim)
    k_nope, v = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
    query = torch.cat([q_nope, q_rot], dim=-1).transpose(1, 2).contiguous()
    causal = kwargs.get("is_causal")  # sdpa honours a caller's is_causal=False; so do we
    causal = self.is_causal if causal is None else bool(causal)
    max_len = kwargs.get("max_length_q")  # HF's flash-attention kwargs: given with cu_seq_lens_q, no host sync
    max_seqlen = max_len if isinstance(max_len, int) and kwargs.get("cu_seq_lens_q") is not None else None
    out, _ = mla_attention(query, k_nope.contiguous(), k_rot[:, 0].contiguous(), v.contiguous(), causal=causal,
                           softmax_scale=self.scaling, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)  # fmt: skip
    return self.o_proj(out.to(hidden_states.dtype).reshape(B, S, -1)), None


def _hf_attention(module):
    """HF's forward bound to ``module``, whether the class or the instance was patched."""
    return types.MethodType(_original(_modeling().DeepseekV3Attention, "forward"), module)


# ---------------------------------------------------------------------------------------------- FP8 linears


def _recipe_linear(name: str) -> bool:
    parts = name.split(".")
    if parts[-1] == "base_layer" and len(parts) > 1:  # wrapped by an adapter (PEFT's LoRA): the linear inside
        parts.pop()
    return parts[-1] in FP8_LINEARS


def _fp8_layer(layer: nn.Module) -> list[str]:
    """Convert a decoder layer's recipe linears to FP8; returns the names of those that stay."""
    skipped = []
    for name, module in layer.named_modules():
        if _recipe_linear(name) and isinstance(module, nn.Linear) and not to_fp8_linear(module):
            skipped.append(name)
    return skipped


# ---------------------------------------------------------------------------------------------- patching


def _original(owner: type, name: str):
    """``owner.name`` as HF defined it (inherited or its own), however often it was patched since."""
    own = _SAVED.get((owner, name), owner.__dict__.get(name, _MISSING))
    if own is not _MISSING:
        return own
    return next(base.__dict__[name] for base in owner.__mro__[1:] if name in base.__dict__)


def _set_class_attr(owner: type, name: str, value) -> None:
    _SAVED.setdefault((owner, name), owner.__dict__.get(name, _MISSING))
    setattr(owner, name, value)


def _patch_classes(m, attention: bool, moe: bool, fp8_linear: bool) -> None:
    if attention:
        _set_class_attr(m.DeepseekV3Attention, "forward", attention_forward)
    if moe:
        _set_class_attr(m.DeepseekV3TopkRouter, "forward", router_forward)
        choose = _original(m.DeepseekV3PreTrainedModel, "get_correct_experts_implementation")

        def get_correct_experts_implementation(self, requested_experts):
            if requested_experts is None:  # HF's default would be grouped_mm; a name given explicitly wins
                fit = _fp8_experts_fit(self.config.hidden_size, self.config.moe_intermediate_size)
                requested_experts = EXPERTS_FP8 if fp8_linear and fit else EXPERTS
            return choose(self, requested_experts)

        _set_class_attr(m.DeepseekV3PreTrainedModel, "get_correct_experts_implementation",
                        get_correct_experts_implementation)  # fmt: skip
    if fp8_linear:
        layer_init = _original(m.DeepseekV3DecoderLayer, "__init__")

        def __init__(self, config, layer_idx):
            layer_init(self, config, layer_idx)
            _fp8_layer(self)

        _set_class_attr(m.DeepseekV3DecoderLayer, "__init__", __init__)


def _patch_instance(m, model: nn.Module, attention: bool, moe: bool, fp8_linear: bool) -> list[str]:
    layers = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, m.DeepseekV3DecoderLayer)]
    if not layers:
        raise TypeError(f"model must hold DeepseekV3DecoderLayer modules (a DeepseekV3ForCausalLM / DeepseekV3Model),"
                        f" got {type(model).__name__}")  # fmt: skip
    moe_layers = [(name, layer) for name, layer in layers if isinstance(layer.mlp, m.DeepseekV3MoE)]
    act = moe_layers[0][1].mlp.config.hidden_act if moe_layers else "silu"
    if moe and act != "silu":
        raise ValueError(f"moe=True needs hidden_act='silu' (the r1kernels experts are SwiGLU), got {act!r}")
    skipped = []
    for prefix, layer in layers:
        if attention:
            layer.self_attn.forward = types.MethodType(attention_forward, layer.self_attn)
        if fp8_linear:
            skipped += [f"{prefix}.{name}" for name in _fp8_layer(layer)]
    if not moe:
        return skipped
    implementation = EXPERTS
    if fp8_linear:
        config = moe_layers[0][1].mlp.config if moe_layers else None
        if config is not None and _fp8_experts_fit(config.hidden_size, config.moe_intermediate_size):
            implementation = EXPERTS_FP8
        else:
            skipped += [f"{prefix}.mlp.experts" for prefix, _ in moe_layers]
    for _, layer in moe_layers:
        layer.mlp.gate.forward = types.MethodType(router_forward, layer.mlp.gate)
    setter = getattr(model, "set_experts_implementation", None)
    if setter is not None:
        setter(implementation)
    else:  # a wrapper that hides the PreTrainedModel: the experts read their (shared) config
        for _, layer in moe_layers:
            layer.mlp.experts.config._experts_implementation = implementation
    return skipped


def apply_r1kernels_to_deepseek_v3(model: nn.Module | None = None, *, attention: bool = True, moe: bool = True,
                                   fp8_linear: bool = False) -> list[str]:  # fmt: skip
    """Run transformers' DeepSeek-V3 on r1kernels ops (the module docstring says what each switch replaces and
    when HF's own code still runs).

    Args:
        model: a built ``DeepseekV3ForCausalLM`` / ``DeepseekV3Model`` (or any module holding
            ``DeepseekV3DecoderLayer`` modules, e.g. a PEFT wrapper): its modules are patched in place. None:
            the classes are patched, so models built afterwards (``from_pretrained`` included) use r1kernels;
            the attention and router also reach models already built, FP8 linears and the default experts
            implementation only new ones.
        attention / moe / fp8_linear: which parts to replace. False leaves that part as it is (it does not undo
            an earlier patch).

    Returns the names of modules left out of FP8 (linears whose features are not multiples of 16, experts
    whose dims are not): empty unless ``fp8_linear``, and always for class patching. Patching twice is
    harmless. Raises TypeError when ``model`` is not an ``nn.Module`` holding DeepSeek-V3 decoder layers,
    ValueError for ``moe=True`` on a model whose ``hidden_act`` is not ``"silu"``.
    """
    for name, value in (("attention", attention), ("moe", moe), ("fp8_linear", fp8_linear)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers DeepSeek-V3 model (an nn.Module) or None, got "
                        f"{type(model).__name__}")  # fmt: skip
    m = _modeling()
    register_experts()
    if model is None:
        _patch_classes(m, attention, moe, fp8_linear)
        return []
    return _patch_instance(m, model, attention, moe, fp8_linear)


def revert_r1kernels_deepseek_v3() -> None:
    """Undo every class patch: HF's forwards and defaults come back. Instances patched one by one keep their
    r1kernels forwards; the experts implementations stay registered (selectable by name)."""
    for (owner, name), value in _SAVED.items():
        if value is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, value)
    _SAVED.clear()


# the names are selectable in a config as soon as this module is imported; without transformers,
# apply_r1kernels_to_deepseek_v3 says what is missing
with contextlib.suppress(ImportError):
    register_experts()
