"""GRPO on the tiny DeepSeek-V3 (``r1kernels.model``) and the addition task (``task.py``): R1-Zero in miniature.

A short supervised warm-up on worked solutions (R1's cold start; the loss is the fused LM-head log-probs as
cross-entropy, no [tokens, vocab] logits), then GRPO: a group of sampled completions per prompt (the absorbed
MLA decode path over the paged latent cache), R1's rule-based rewards (accuracy + format), group-normalised
advantages, old and reference log-probs through ``token_logprobs``, the fused ``grpo_loss``, AdamW, and the
routing-bias update of every MoE layer each step. Every ``check_every`` steps the loss, its metrics and the
gradients of the LM head's inputs are recomputed by the float64 reference and compared.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch

from r1kernels.grpo import group_advantages, grpo_loss, token_logprob_stats, token_logprobs
from r1kernels.model import DeepseekV3ForCausalLM, ModelConfig
from r1kernels.moe import update_correction_bias
from r1kernels.train.grpo_addition import _reference_check
from r1kernels.train.task import AdditionTask

PROMPT = 6  # tokens per prompt ("12+07=")


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(vocab_size=19))
    warmup_steps: int = 60
    steps: int = 60
    prompts: int = 16  # prompts per GRPO step
    group: int = 8  # completions per prompt
    max_new_tokens: int = 16
    temperature: float = 1.0
    lr: float = 3e-3  # warm-up
    grpo_lr: float = 5e-4
    beta: float = 0.02
    bias_update_rate: float = 1e-3
    check_every: int = 10
    max_operand: int = 9  # single-digit operands: a sum a micro model can learn on a CPU in minutes
    seed: int = 0


def _completion_mask(completions: torch.Tensor, eos: int) -> torch.Tensor:
    """1 up to and including the first ``<eos>``, 0 after it."""
    is_eos = (completions == eos).int()
    after = (torch.cumsum(is_eos, 1) - is_eos) > 0
    return (~after).float()


def _hidden(model, prompts, completions):
    """Hidden states that predict each completion token ``[n, C, H]``."""
    ids = torch.cat([prompts, completions], 1)
    return model.hidden_states(ids[:, :-1])[:, PROMPT - 1 :]


def warmup(model, task, steps, batch, opt, generator) -> float:
    """Supervised steps on worked solutions; returns the last loss."""
    tok = task.tokenizer
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        problems = task.sample(batch, generator)
        targets = [[*tok.encode(p.worked_solution()), tok.eos] for p in problems]
        width = max(len(t) for t in targets)
        completions = torch.tensor([t + [tok.pad] * (width - len(t)) for t in targets])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(t) for t in targets])[:, None]).float()
        hidden = _hidden(model, task.encode_prompts(problems), completions)
        logps, _, _ = token_logprob_stats(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                                          completions.reshape(-1))  # fmt: skip
        logps = logps.view(completions.shape)
        loss = -(logps * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def train(cfg: Config, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    task = AdditionTask(max_operand=cfg.max_operand, held_out=20, seed=cfg.seed)
    model = DeepseekV3ForCausalLM(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    t0 = time.perf_counter()
    sft_loss = warmup(model, task, cfg.warmup_steps, cfg.prompts * cfg.group // 2, opt, gen)
    reference = copy.deepcopy(model).requires_grad_(False)
    for group in opt.param_groups:
        group["lr"] = cfg.grpo_lr
    log(f"warm-up: {cfg.warmup_steps} steps, loss {sft_loss:.3f}; then GRPO")
    history, worst = [], 0.0
    for step in range(cfg.steps):
        problems = [p for p in task.sample(cfg.prompts, gen) for _ in range(cfg.group)]
        prompts = task.encode_prompts(problems)
        model.eval()
        completions = model.generate(prompts, cfg.max_new_tokens, cfg.temperature, generator=gen)
        model.train()
        texts = [task.tokenizer.decode(c) for c in completions]
        accuracy, fmt = task.rewards(problems, texts)
        rewards = accuracy + fmt
        advantages = group_advantages(rewards, cfg.group)
        mask = _completion_mask(completions, task.tokenizer.eos)
        with torch.no_grad():
            old = token_logprobs(_hidden(model, prompts, completions), model.lm_head.weight, completions)
            ref = token_logprobs(_hidden(reference, prompts, completions), reference.lm_head.weight, completions)
        hidden = _hidden(model, prompts, completions)
        hidden.retain_grad()
        kwargs = dict(old_logps=old, ref_logps=ref, beta=cfg.beta, loss_type="dapo")
        loss, metrics = grpo_loss(hidden, model.lm_head.weight, completions, mask, advantages, return_entropy=True,
                                  **kwargs)  # fmt: skip
        opt.zero_grad()
        loss.backward()
        if step % cfg.check_every == 0:
            worst = max(worst, *_reference_check(hidden, model.lm_head.weight, completions, mask, advantages, loss,
                                                 metrics, kwargs))  # fmt: skip
        opt.step()
        for moe in model.moe_layers():
            update_correction_bias(moe.gate.e_score_correction_bias, moe.last_tokens_per_expert, cfg.bias_update_rate)
        history.append({"step": step, "reward": float(rewards.mean()), "accuracy": float(accuracy.mean()),
                        "format": float(fmt.mean()), "loss": float(loss.detach()), "kl": float(metrics["kl"]),
                        "length": float(mask.sum(1).mean())})  # fmt: skip
        if step % 10 == 0 or step == cfg.steps - 1:
            h = history[-1]
            log(f"step {step:>4} reward {h['reward']:.3f} acc {h['accuracy']:.3f} format {h['format']:.3f} "
                f"kl {h['kl']:.4f} len {h['length']:.1f}")  # fmt: skip
    first = sum(h["reward"] for h in history[:10]) / max(1, len(history[:10]))
    last = sum(h["reward"] for h in history[-10:]) / max(1, len(history[-10:]))
    return {"first_reward": first, "last_reward": last, "worst_reference_error": worst, "history": history,
            "seconds": time.perf_counter() - t0}  # fmt: skip
