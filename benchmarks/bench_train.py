"""Main-job benchmark: one GRPO training step (forward + backward of the loss on a sampled-size batch) of the tiny
DeepSeek-V3, three ways: r1kernels' kernel path (fused GRPO loss, MLA / MoE kernels), the same model through
the reference path (``r1kernels.reference_mode``: float64 references, the validation's path), and transformers'
``DeepseekV3ForCausalLM`` with the same weights and a plain GRPO loss on full logits. Time and peak memory
(RSS high-water of a fresh process on the CPU; allocator peak on a GPU), tokens/s. Floor: the step's FLOPs
(6 x active parameters per token, the LM head included, plus causal attention's 3.5 x 2 x S^2 / 2 x heads x
(d_qk + d_v) per layer and sequence) at 989 TFLOP/s bf16; at this micro size a step is launch-bound on a GPU,
so the ratio says how far host overhead is from the math.

    python benchmarks/bench_train.py [--rows 128] [--length 22]
"""

from __future__ import annotations

import argparse

import torch
from common import (
    H100_BF16_TFLOPS,
    Plot,
    device_name,
    flops_floor_ms,
    peak_mem_mib,
    peak_mem_mib_fresh_process,
    time_ms,
    write_table,
)

from r1kernels.grpo import grpo_loss
from r1kernels.grpo import reference as grpo_reference
from r1kernels.model import DeepseekV3ForCausalLM, ModelConfig
from r1kernels.reference_mode import reference_ops

PROMPT = 6
CONFIG = ModelConfig(vocab_size=19)


def _setup(rows, length, device):
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(CONFIG).to(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, CONFIG.vocab_size, (rows, length), generator=g).to(device)
    mask = (torch.rand(rows, length - PROMPT, generator=g) < 0.8).float().to(device)
    adv = torch.randn(rows, generator=g).to(device)
    old = torch.randn(rows, length - PROMPT, generator=g).to(device).clamp(-5, 0)
    return model, ids, mask, adv, old


def _step(impl, model, ids, mask, adv, old, hf=None):
    kw = dict(old_logps=old, ref_logps=old, beta=0.02, loss_type="dapo")
    if impl == "r1k kernels":
        hidden = model.hidden_states(ids[:, :-1])[:, PROMPT - 1 :]
        loss, _ = grpo_loss(hidden, model.lm_head.weight, ids[:, PROMPT:], mask, adv, **kw)
    elif impl == "r1k reference path":
        with reference_ops():
            hidden = model.hidden_states(ids[:, :-1])[:, PROMPT - 1 :]
            loss, _ = grpo_reference.grpo_loss(hidden.double(), model.lm_head.weight.double(), ids[:, PROMPT:], mask,
                                               adv, **kw)  # fmt: skip
    else:  # transformers' model, TRL-style GRPO loss on full logits
        logits = hf(ids[:, :-1]).logits[:, PROMPT - 1 :].float()
        logps = torch.log_softmax(logits, -1).gather(-1, ids[:, PROMPT:, None]).squeeze(-1)
        ratio = torch.exp(logps - old)
        per_token = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
        kl = torch.exp(old - logps) - (old - logps) - 1
        loss = ((per_token + 0.02 * kl) * mask).sum() / mask.sum()
    model.zero_grad(set_to_none=True)
    if hf is not None:
        hf.zero_grad(set_to_none=True)
    loss.backward()


def _hf(model):
    try:
        import transformers
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3ForCausalLM as HF
    except ImportError:
        return None
    c = CONFIG
    hf_config = transformers.DeepseekV3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads,
        n_shared_experts=c.n_shared_experts, n_routed_experts=c.n_routed_experts,
        routed_scaling_factor=c.routed_scaling_factor, kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank,
        qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, qk_nope_head_dim=c.qk_nope_head_dim,
        n_group=c.n_group, topk_group=c.topk_group, num_experts_per_tok=c.num_experts_per_tok,
        first_k_dense_replace=c.first_k_dense_replace, tie_word_embeddings=False, attn_implementation="sdpa",
        experts_implementation="grouped_mm",
    )  # fmt: skip
    hf = HF(hf_config).to(model.lm_head.weight.device)
    hf.load_state_dict(model.state_dict())
    return hf


def step_flops(model, rows: int, length: int) -> float:
    """Forward + backward FLOPs of one step: 6 per active parameter and token (routed experts count k / E of
    their weights, embeddings none), and causal attention per layer and sequence."""
    c = CONFIG
    tokens = rows * (length - 1)
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    active = params - routed * (1 - c.num_experts_per_tok / c.n_routed_experts)
    s = length - 1
    attention = 3.5 * 2 * s * s / 2 * c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
    return 6 * active * tokens + attention * c.num_hidden_layers * rows


IMPLS = ("r1k kernels", "r1k reference path", "transformers + plain GRPO loss")


def _run_one(impl, rows, length, device):
    model, ids, mask, adv, old = _setup(rows, length, device)
    hf = _hf(model) if impl.startswith("transformers") else None
    if impl.startswith("transformers") and hf is None:
        return None
    return lambda: _step(impl, model, ids, mask, adv, old, hf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--length", type=int, default=22)
    parser.add_argument("--mem-child", nargs=3, help=argparse.SUPPRESS)  # impl, rows, length
    args = parser.parse_args()
    if args.mem_child:
        impl, rows, length = args.mem_child[0], int(args.mem_child[1]), int(args.mem_child[2])
        fn = _run_one(impl, rows, length, "cpu")
        fn()  # warm-up
        print(peak_mem_mib(fn, "cpu"))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    tokens = args.rows * (args.length - 1)
    base = None
    for impl in IMPLS:
        fn = _run_one(impl, args.rows, args.length, device)
        if fn is None:
            continue
        ms = time_ms(fn, device, reps=3)
        if device == "cuda":
            mem = peak_mem_mib(fn, device)
        else:
            mem = peak_mem_mib_fresh_process(__file__, [impl, str(args.rows), str(args.length)])
        base = base or ms
        floor = flops_floor_ms(step_flops(DeepseekV3ForCausalLM(CONFIG), args.rows, args.length), H100_BF16_TFLOPS)
        rows.append([f"{args.rows} x {args.length} tokens", impl, ms, ms / base, tokens / ms * 1e3, mem, floor,
                     floor / ms])  # fmt: skip
    note = (f"device: {device_name(device)}; one GRPO step (forward + backward) of the tiny DeepSeek-V3 "
          f"(2 layers, hidden 64, 8 experts top-2, kv_lora_rank 512, vocab {CONFIG.vocab_size})")  # fmt: skip
    header = ["batch", "impl", "ms", "time vs r1k", "tokens/s", "peak MiB", "floor ms (H100)", "floor/achieved"]
    write_table(
        f"train_{device}", header, rows, Plot(("batch",), "impl", "ms", "GRPO step, ms (lower is better)"), note=note
    )


if __name__ == "__main__":
    main()
