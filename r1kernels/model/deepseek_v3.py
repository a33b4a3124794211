"""A DeepSeek-V3-shaped causal LM built from r1kernels' layers, with HF transformers' parameter names and
shapes (``DeepseekV3ForCausalLM``), so state dicts move between the two."""

from __future__ import annotations

import torch
from torch import nn

from r1kernels.fp8.linear import to_fp8_linear
from r1kernels.mla import MLA, RMSNorm
from r1kernels.model.config import ModelConfig
from r1kernels.moe import MoE
from r1kernels.moe.layer import SwiGLU

PAGE = 64  # the paged latent cache's page size for generation


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int, device=None, dtype=None, ep_group=None):
        super().__init__()
        c = config
        kw = dict(device=device, dtype=dtype)
        self.self_attn = MLA(c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim,
                             c.qk_rope_head_dim, c.v_head_dim, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                             rope_interleave=c.rope_interleave, attention_bias=c.attention_bias,
                             rms_norm_eps=c.rms_norm_eps, **kw)  # fmt: skip
        if index < c.first_k_dense_replace:
            self.mlp = SwiGLU(c.hidden_size, c.intermediate_size, **kw)
        else:
            self.mlp = MoE(c.hidden_size, c.moe_intermediate_size, c.n_routed_experts, c.n_shared_experts,
                           c.num_experts_per_tok, c.n_group, c.topk_group, c.routed_scaling_factor, c.norm_topk_prob,
                           fp8=c.fp8, ep_group=ep_group, **kw)  # fmt: skip
            self.mlp.gate.float()  # the router stays fp32, as DeepSeek's
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        if c.fp8:  # the recipe's linears (the router is a parameter, not an nn.Linear, and stays fp32)
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    to_fp8_linear(module)

    def forward(self, h, positions, cache=None):
        """cache: None (training path) or (kv_cache, block_table, lengths) for the absorbed decode path; returns
        (h, new lengths or None)."""
        x = self.input_layernorm(h)
        lengths = None
        if cache is None:
            attn = self.self_attn(x, positions)
        else:
            attn, lengths = self.self_attn.decode(x, positions, *cache)
        h = h + attn
        return h + self.mlp(self.post_attention_layernorm(h)), lengths


class DeepseekV3Model(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None, ep_group=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, device, dtype, ep_group)
                                    for i in range(config.num_hidden_layers))  # fmt: skip
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)


class DeepseekV3ForCausalLM(nn.Module):
    """``model.embed_tokens``, ``model.layers[i].{self_attn, mlp, input_layernorm, post_attention_layernorm}``,
    ``model.norm``, ``lm_head``: HF's names. Dense SwiGLU for the first ``first_k_dense_replace`` layers, MoE
    after (group-limited routing with the correction bias, shared expert); ``config.fp8``: the FP8 recipe for the
    experts and every block linear (the absorbed decode path reads kv_b_proj's master weight).

    ``model(input_ids [B, T])`` -> logits ``[B, T, V]`` (fp32); ``hidden_states(input_ids)`` -> the final normed
    hidden states ``[B, T, H]`` that feed ``r1kernels.grpo.grpo_loss`` with ``lm_head.weight`` (no [B, T, V]
    logits in training); ``generate`` samples with the absorbed MLA decode path over a paged latent cache.

    ``ep_group``: expert parallelism over a ``torch.distributed`` group (each rank holds E / W experts of every
    MoE layer; ``shard_state_dict`` cuts a full state dict for a rank). Everything else is replicated: for data
    parallelism all-reduce the replicated parameters' gradients (``replicated_parameters``).
    """

    def __init__(self, config: ModelConfig, device=None, dtype=None, ep_group=None):
        super().__init__()
        self.config = config
        self.model = DeepseekV3Model(config, device, dtype, ep_group)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def replicated_parameters(self):
        """(name, parameter) of everything but the routed experts (which expert parallelism shards)."""
        return [(n, p) for n, p in self.named_parameters() if ".mlp.experts." not in n]

    shard_state_dict = staticmethod(MoE.shard_state_dict)  # a full state dict cut to a rank's experts

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h, _ = layer(h, positions)
        return self.model.norm(h)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids)).float()

    def new_cache(self, batch: int, max_tokens: int):
        """Per layer: (kv_cache [blocks, PAGE, 576], block_table [B, blocks per sequence], lengths [B])."""
        c = self.config
        if c.kv_lora_rank + c.qk_rope_head_dim != 576:
            raise ValueError("the paged-cache decode path needs kv_lora_rank 512 and qk_rope_head_dim 64")
        per_seq = -(-max_tokens // PAGE)
        dev, dt = self.lm_head.weight.device, self.lm_head.weight.dtype
        table = torch.arange(batch * per_seq, dtype=torch.int32, device=dev).view(batch, per_seq)
        return [[torch.zeros(batch * per_seq, PAGE, 576, device=dev, dtype=dt), table,
                 torch.zeros(batch, dtype=torch.int32, device=dev)] for _ in self.model.layers]  # fmt: skip

    def decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """Logits ``[B, s, V]`` of new tokens at ``positions``, attending to the cache; appends their latents."""
        h = self.model.embed_tokens(input_ids)
        for layer, layer_cache in zip(self.model.layers, cache, strict=True):
            h, layer_cache[2] = layer(h, positions, tuple(layer_cache))
        return self.lm_head(self.model.norm(h)).float()

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """Sample ``max_new_tokens`` after each prompt row (all rows the same length); temperature 0 is greedy.
        The prompt is prefilled through the absorbed decode path, then one token per step."""
        B, T = prompt_ids.shape
        cache = self.new_cache(B, T + max_new_tokens)
        positions = torch.arange(T, device=prompt_ids.device).expand(B, T)
        logits = self.decode_step(prompt_ids, positions, cache)[:, -1]
        out = []
        for step in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(-1)
            else:
                token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
            out.append(token)
            if step + 1 < max_new_tokens:
                pos = torch.full((B, 1), T + step, device=prompt_ids.device)
                logits = self.decode_step(token[:, None], pos, cache)[:, -1]
        return torch.stack(out, 1)
