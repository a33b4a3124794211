"""GRPO on the tiny DeepSeek-V3 (``r1kernels.model``) and the addition task (``task.py``): R1-Zero in miniature.

A short supervised warm-up on worked solutions (R1's cold start; the loss is the fused LM-head log-probs as
cross-entropy, no [tokens, vocab] logits), then GRPO: a group of sampled completions per prompt (the absorbed
MLA decode path over the paged latent cache), R1's rule-based rewards (accuracy + format), group-normalised
advantages, old and reference log-probs through ``token_logprobs``, the fused ``grpo_loss``, AdamW, and the
routing-bias update of every MoE layer each step. At step 0 and every ``check_every`` steps the same batch also
runs through the reference path (``validate.py``): the loss and every parameter's gradient are compared and
the worst error per op family logged; past tolerance the run stops naming the family. ``Trainer`` keeps
the whole state, so a checkpoint resumes to the same next step bit for bit.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from r1kernels.grpo import group_advantages, grpo_loss, token_logprob_stats, token_logprobs
from r1kernels.grpo import reference as grpo_reference
from r1kernels.model import DeepseekV3ForCausalLM, ModelConfig
from r1kernels.moe import update_correction_bias
from r1kernels.train.task import AdditionTask
from r1kernels.train.validate import PinnedRoutes, validate_step

PROMPT = 6  # tokens per prompt ("12+07=")


class Tolerances(NamedTuple):
    """Whole-model validation bars (``validate_step``'s arguments in order): block outputs on the same input;
    the loss and each family's end-to-end gradients; the floor under a family's gradient norm; each kernel op's
    output, input and weight gradients on the same input and output gradient; there, the attention core's
    gradients and the FP8 experts (``r1kernels.train.op_checks.KINDS`` says why those two differ)."""

    outputs: float
    gradients: float
    gradient_floor: float
    ops: float
    attention_gradients: float
    fp8_experts: float


# By (dtype, FP8). The reference path computes each op in float64 from the same parameters and inputs, stores
# what the kernel path stores in its dtype, and with FP8 rounds the same operands through e4m3 on the same tiles
# (``r1kernels.fp8.reference``), so on the same input an op differs only in accumulation order (and the attention
# core's gradients in bf16 by FlashAttention's 16-bit arithmetic): the ops bars are tight in every precision and
# a 1% error in any kernel's output, or 3% in a weight gradient, crosses them (python_tests/
# test_train_deepseek_grpo.py plants both). End to end, last-bit differences grow through the layers, and with
# FP8 every one that flips an e4m3 rounding moves a value by up to 1/16; the KL term's gradient is a difference
# of the two models' log-probs, as small as that noise when the policy has barely moved: those bars only catch
# gross errors with FP8 (a sign, a factor of 2, a NaN). Worst seen on the micro model: C++ / torch CPU
# paths (3 seeds x 2 steps after a 20-step warm-up, and 45 seeds x 2 steps of the tests' 2-step warm-up with the
# policy moved 3% off its reference) and Triton in the interpreter ("Tr": 3 seeds, the CLI test's 1 x 2 x
# 3-token batch, policy moved 3%); the bars below leave >= 2.4x over them (mostly 5-20x):
#               outputs           ops / attention grads / FP8 experts        end-to-end gradients
#   fp32        3e-7              1.1e-6 / 1.0e-6 / -                        1.3e-5
#   fp32 + FP8  2.1e-3 (*)        3.7e-7 / 8e-7 / 3.7e-3 (*)                 9.2e-2
#   bf16        3.7e-4, Tr 2.1e-3 1.3e-3 / 1.3e-2, Tr 4.8e-3 / -             6.4e-3, Tr 2.8e-2
#   bf16 + FP8  6.9e-3, Tr 8.6e-3 1.0e-3 / 1.3e-2, Tr 3.7e-3 / 8.4e-4 (*)    3.7e-2, Tr 0.34
# (*) An operand computed inside the op or block (the experts' SwiGLU activations; in a block, every projection's
# input) has last bits that follow the accumulation order, and now and then lands on the other side of an e4m3
# rounding (a 1/16 move of that value): up to 7.4e-4 over 30 seeds of python_tests/test_moe_layer.py's 150-token
# experts, 3.7e-3 in a micro batch with a handful of tokens per expert. So the FP8 experts are held to 1.5e-2: a
# 3% weight-gradient error fails them, a 1% output error may not. FP8 linears take their operands as given:
# 2e-7 (fp32), 9e-5 (bf16) on their own.
# The floor: with policy == reference and every completion of a group scored alike the gradient is exactly 0
# in both paths; a few advantages give norms of 1e-3-0.5.
TOLERANCES = {("float32", False): Tolerances(1e-3, 1e-3, 1e-4, 1e-4, 1e-4, 1e-4),
              ("float32", True): Tolerances(1e-2, 0.5, 1e-4, 1e-4, 1e-4, 1.5e-2),
              ("bfloat16", False): Tolerances(2e-2, 0.1, 1e-2, 5e-3, 5e-2, 5e-3),
              ("bfloat16", True): Tolerances(5e-2, 1.0, 1e-2, 5e-3, 5e-2, 1.5e-2)}  # fmt: skip


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
    grpo_lr: float = 5e-4  # at the warm-up's rate the policy runs off (KL 1-2 in 60 steps)
    beta: float = 0.02
    bias_update_rate: float = 1e-3
    check_every: int = 10  # whole-model kernel-vs-reference validation every this many steps (and at step 0)
    tolerance: Tolerances | None = None  # None: TOLERANCES for the run's precision
    reference_reset_every: int = 0  # > 0: copy the policy into the reference model every this many steps
    dtype: str = "float32"  # the model's parameters: float32 or bfloat16 (the router stays fp32)
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


class Trainer:
    """The run's whole state. Under ``torch.distributed`` (torchrun) with W > 1 processes: data parallel (each
    rank takes 1/W of every batch; every rank draws the same global problems from the same generator) and
    expert parallel (each rank holds 1/W of every MoE layer's experts); the loss is normalised by the global
    token count and the replicated parameters' gradients are summed, so a step equals one process's on the
    whole batch. The whole-model validation runs only with one process (its reference path needs every
    expert)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if cfg.prompts % self.world:
            raise ValueError(f"prompts ({cfg.prompts}) must split evenly over the {self.world} processes")
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.task = AdditionTask(max_operand=cfg.max_operand, held_out=20, seed=cfg.seed)
        self.model = self._new_model()
        if self.world > 1:
            torch.manual_seed(cfg.seed)  # the same full model on every rank, then this rank's experts
            full = DeepseekV3ForCausalLM(cfg.model).to(self.model.lm_head.weight.dtype).state_dict()
            self.model.load_state_dict(DeepseekV3ForCausalLM.shard_state_dict(full, self.rank, self.world))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr)
        self.reference: DeepseekV3ForCausalLM | None = None  # the warm-up model, once warmed up
        self.step = 0
        self.history: list[dict] = []
        self.worst_reference_error = 0.0

    def _new_model(self) -> DeepseekV3ForCausalLM:
        model = DeepseekV3ForCausalLM(self.cfg.model, ep_group=dist.group.WORLD if self.world > 1 else None)
        if self.cfg.dtype == "bfloat16":
            model = model.to(torch.bfloat16)
            for moe in model.moe_layers():
                moe.gate.float()
        return model

    @property
    def tolerance(self) -> Tolerances:
        """The configured validation bars, or TOLERANCES' for the run's dtype and FP8 switch."""
        return self.cfg.tolerance or TOLERANCES[(self.cfg.dtype, self.cfg.model.fp8)]

    def _mine(self, items):
        """This rank's share of a global batch (whole prompt groups)."""
        n = len(items) // self.world
        return items[self.rank * n : (self.rank + 1) * n]

    def _global_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def _sync_gradients(self) -> None:
        if self.world > 1:
            for _, p in self.model.replicated_parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)

    def warmup(self) -> float:
        """Supervised steps on worked solutions, then the reference model is frozen; returns the last loss."""
        tok, cfg = self.task.tokenizer, self.cfg
        loss = torch.tensor(float("nan"))
        for _ in range(cfg.warmup_steps):
            problems = self._mine(self.task.sample(cfg.prompts * cfg.group // 2, self.gen))
            targets = [[*tok.encode(p.worked_solution()), tok.eos] for p in problems]
            width = max(len(t) for t in targets)
            completions = torch.tensor([t + [tok.pad] * (width - len(t)) for t in targets])
            mask = (torch.arange(width)[None, :] < torch.tensor([len(t) for t in targets])[:, None]).float()
            hidden = _hidden(self.model, self.task.encode_prompts(problems), completions)
            logps, _, _ = token_logprob_stats(hidden.reshape(-1, hidden.shape[-1]), self.model.lm_head.weight,
                                              completions.reshape(-1))  # fmt: skip
            loss = -(logps.view(completions.shape) * mask).sum() / self._global_sum(mask.sum())
            self.opt.zero_grad()
            loss.backward()
            self._sync_gradients()
            self.opt.step()
        self.reference = self._new_model().requires_grad_(False)
        self.reference.load_state_dict(self.model.state_dict())
        for group in self.opt.param_groups:
            group["lr"] = cfg.grpo_lr
        return float(loss.detach())

    def grpo_step(self) -> dict:
        cfg, model = self.cfg, self.model
        problems = [p for p in self._mine(self.task.sample(cfg.prompts, self.gen)) for _ in range(cfg.group)]
        prompts = self.task.encode_prompts(problems)
        completions = model.generate(prompts, cfg.max_new_tokens, cfg.temperature, generator=self.gen)
        texts = [self.task.tokenizer.decode(c) for c in completions]
        accuracy, fmt = self.task.rewards(problems, texts)
        rewards = accuracy + fmt
        advantages = group_advantages(rewards, cfg.group)
        mask = _completion_mask(completions, self.task.tokenizer.eos)
        checking = self.step % cfg.check_every == 0 and self.world == 1
        with torch.no_grad(), PinnedRoutes(self.reference) as reference_routes:  # recorded for the check's replay
            ref = token_logprobs(_hidden(self.reference, prompts, completions), self.reference.lm_head.weight,
                                 completions)  # fmt: skip
        # one update per batch: the sampling policy is the current one (old_logps None = on-policy, ratio 1),
        # so its log-probs need no forward of their own
        kwargs = dict(old_logps=None, ref_logps=ref, beta=cfg.beta, loss_type="dapo",
                      num_items_in_batch=float(self._global_sum(mask.sum())))  # fmt: skip
        metrics = {}

        def loss_fn(reference: bool) -> torch.Tensor:
            hidden = _hidden(model, prompts, completions)
            if reference:  # the float64 GRPO reference on full logits, from the reference path's hidden states
                # and with the frozen reference model's log-probs from the reference path too: the KL term then
                # compares like with like (at a reset it is exactly 0 in both paths, not one path's round-off
                # against the other's; with few advantages that round-off would be the whole gradient)
                with torch.no_grad(), reference_routes.pinned():
                    ref_model_logps, _ = grpo_reference.token_logprobs(
                        _hidden(self.reference, prompts, completions), self.reference.lm_head.weight, completions
                    )
                loss, _ = grpo_reference.grpo_loss(hidden.double(), model.lm_head.weight.double(), completions, mask,
                                                   advantages, **{**kwargs, "ref_logps": ref_model_logps})  # fmt: skip
                return loss
            loss, found = grpo_loss(hidden, model.lm_head.weight, completions, mask, advantages, return_entropy=True,
                                    **kwargs)  # fmt: skip
            metrics.update(found)
            return loss

        checked = {}
        if checking:  # both paths; the kernel path's gradients stay
            loss, checked = validate_step(model, loss_fn, *self.tolerance)
            self.worst_reference_error = max(self.worst_reference_error, *checked.values())
        else:
            self.opt.zero_grad()
            loss = loss_fn(False)
            loss.backward()
        self._sync_gradients()
        self.opt.step()
        if cfg.reference_reset_every and (self.step + 1) % cfg.reference_reset_every == 0:
            self.reference.load_state_dict(model.state_dict())  # the reference follows the policy (a reset)
        loads = []
        for moe in model.moe_layers():
            counts = self._global_sum(moe.last_tokens_per_expert)  # every rank moves its bias the same way
            update_correction_bias(moe.gate.e_score_correction_bias, counts, cfg.bias_update_rate)
            load = counts.float()
            loads.append(float(load.max() / load.mean().clamp_min(1e-9)))
        n = float(self._global_sum(torch.tensor(float(len(problems)))))

        def mean(t):  # over the global batch
            return float(self._global_sum(t.sum())) / n

        record = {"step": self.step, "reward": mean(rewards), "accuracy": mean(accuracy), "format": mean(fmt),
                  "loss": float(self._global_sum(loss.detach())), "kl": float(metrics["kl"]),
                  "clip_fraction": float(metrics["clip_ratio"]), "entropy": float(metrics["entropy"]),
                  "completion_length": float(mask.sum(1).mean()), "routing_max_over_mean": max(loads, default=1.0),
                  "worst_kernel_error": max(checked.values(), default=float("nan")),
                  **{f"kernel_error/{k}": v for k, v in checked.items()}}  # fmt: skip
        self.history.append(record)
        self.step += 1
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        """pass@1 (greedy) accuracy on the held-out problems."""
        problems = self.task.eval_problems
        completions = self.model.generate(self.task.encode_prompts(problems), self.cfg.max_new_tokens, 0.0)
        accuracy, _ = self.task.rewards(problems, [self.task.tokenizer.decode(c) for c in completions])
        return float(accuracy.mean())

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "reference": self.reference.state_dict() if self.reference else None,
                "opt": self.opt.state_dict(), "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                "step": self.step, "history": self.history, "worst": self.worst_reference_error}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if state["reference"] is not None:
            self.reference = self._new_model().requires_grad_(False)
            self.reference.load_state_dict(state["reference"])
            for group in self.opt.param_groups:
                group["lr"] = self.cfg.grpo_lr
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.history, self.worst_reference_error = state["step"], state["history"], state["worst"]


def train(cfg: Config, log=print) -> dict:
    """Warm-up, then ``cfg.steps`` GRPO steps; returns the summary (first / last 10 steps' mean reward, ...)."""
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    sft_loss = trainer.warmup()
    log(f"warm-up: {cfg.warmup_steps} steps, loss {sft_loss:.3f}; then GRPO")
    for _ in range(cfg.steps):
        h = trainer.grpo_step()
        if h["step"] % 10 == 0 or h["step"] == cfg.steps - 1:
            log(f"step {h['step']:>4} reward {h['reward']:.3f} acc {h['accuracy']:.3f} format {h['format']:.3f} "
                f"kl {h['kl']:.4f} len {h['completion_length']:.1f}")  # fmt: skip
    return summarize(trainer, time.perf_counter() - t0)


def summarize(trainer: Trainer, seconds: float) -> dict:
    history = trainer.history
    first = sum(h["reward"] for h in history[:10]) / max(1, len(history[:10]))
    last = sum(h["reward"] for h in history[-10:]) / max(1, len(history[-10:]))
    return {"first_reward": first, "last_reward": last, "worst_reference_error": trainer.worst_reference_error,
            "history": history, "seconds": seconds}  # fmt: skip
