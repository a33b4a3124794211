"""The model's configuration, with DeepseekV3Config's field names (so ``from_hf`` is a field copy)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ModelConfig:
    """A DeepSeek-V3-shaped causal LM; the defaults are a micro model that trains on a CPU in minutes.

    Field names and meanings are ``transformers.DeepseekV3Config``'s; ``fp8`` (ours) runs DeepSeek-V3's FP8
    training recipe: the routed experts' grouped GEMMs and every linear of a block (attention projections, dense
    and shared-expert MLPs, as ``FP8Linear``) in FP8; the router, norms, embeddings and LM head stay.
    ``kv_lora_rank`` 512 and ``qk_rope_head_dim`` 64 (DeepSeek-V3's) are what the paged-cache decode kernel
    takes; other values train, and generate without the cache."""

    vocab_size: int = 64
    hidden_size: int = 64
    intermediate_size: int = 128
    moe_intermediate_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    n_shared_experts: int = 1
    n_routed_experts: int = 8
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 32
    qk_rope_head_dim: int = 64
    v_head_dim: int = 32
    qk_nope_head_dim: int = 32
    n_group: int = 2
    topk_group: int = 1
    num_experts_per_tok: int = 2
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    fp8: bool = False

    @classmethod
    def from_hf(cls, hf_config) -> ModelConfig:
        """From a ``transformers.DeepseekV3Config`` (rope parameters from its ``rope_parameters``)."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "rope_scaling", "fp8"}
        kw = {name: getattr(hf_config, name) for name in fields if hasattr(hf_config, name)}
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        kw["rope_theta"] = rope.pop("rope_theta", 10000.0)
        kw["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        return cls(**kw)
