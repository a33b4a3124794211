"""TRL's GRPOTrainer with r1kernels' fused GRPO loss.

    from r1kernels.integrations.trl import R1GRPOTrainer

    trainer = R1GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=dataset)
    trainer.train()

``R1GRPOTrainer`` is ``trl.GRPOTrainer`` with one method replaced: the loss. TRL runs the model to per-token
log-probs (its chunked LM head) and computes the clipped surrogate, the KL term and the normalisation in
PyTorch on ``[B, T]`` tensors; here the model's backbone returns the last hidden states and
``r1kernels.grpo.grpo_loss`` computes the log-probs, the loss and their gradients into the hidden states and the
LM head in one fused op (Triton on a GPU, a blocked path on the CPU), never materialising ``[tokens, vocab]``.
Generation, rewards, advantages, old / reference log-probs and logging stay TRL's.

``GRPOConfig`` maps one to one: ``loss_type`` (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``), ``importance_sampling_level``
(``token``, ``sequence``), ``epsilon`` / ``epsilon_high``, ``delta``, ``beta`` (reference log-probs from TRL),
``temperature``, ``max_completion_length``, the ``num_items_in_batch`` normalisation under gradient accumulation
and several processes, ``use_bias_correction_kl`` (the ratio-weighted k3), vLLM's importance-sampling correction
and ``off_policy_mask_threshold`` (both fold into the per-token weight of the policy term), and
``cast_lm_head_to_fp32``. Logged metrics: ``kl``, ``entropy``,
``clip_ratio/{low,high,region}_mean`` (global means as TRL computes them; with ``importance_sampling_level=
"sequence"`` the clip fractions are token-weighted). Options the fused loss does not express raise a ValueError
naming them: the ``cispo`` / ``sapo`` / ``vespo`` / ``luspo`` losses, ``top_entropy_quantile < 1``, the entropy
bonus, and a router auxiliary loss.
"""

from __future__ import annotations

import functools
import types

import torch

from r1kernels.grpo import grpo_loss, token_logprobs

try:
    from trl import GRPOTrainer
except ImportError as e:  # the [hf] extra is missing
    raise ImportError("r1kernels.integrations.trl needs trl>=1.16 (r1kernels[hf])") from e

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")


def add_hidden_state_forward(model: torch.nn.Module) -> None:
    """Let ``model(..., r1k_last_hidden_state=True)`` return the backbone's last hidden states ``[B, L, H]``
    (after the final norm, before the LM head). The call still goes through any DDP / FSDP wrapper around the
    model, so gradient synchronisation sees it; without the keyword the forward is the previous one."""
    if getattr(model, "_r1k_hidden_state_forward", False):
        return
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, r1k_last_hidden_state: bool = False, **kwargs):
        if not r1k_last_hidden_state:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        return self.base_model(*args, **kwargs).last_hidden_state

    model.forward = types.MethodType(forward, model)
    model._r1k_hidden_state_forward = True


def unsupported_options(trainer: GRPOTrainer) -> list[str]:
    """The trainer's settings that the fused loss cannot reproduce (empty: every option maps)."""
    problems = []
    if trainer.loss_type not in LOSS_TYPES:
        problems.append(f"loss_type={trainer.loss_type!r} (supported: {', '.join(LOSS_TYPES)})")
    if trainer.importance_sampling_level not in IS_LEVELS:
        problems.append(f"importance_sampling_level={trainer.importance_sampling_level!r}")
    if trainer.top_entropy_quantile < 1.0:
        problems.append(f"top_entropy_quantile={trainer.top_entropy_quantile} (needs 1.0)")
    if getattr(trainer, "_entropy_bonus_enabled", False):
        problems.append("the entropy bonus (entropy_coef / adaptive entropy)")
    if getattr(trainer, "aux_loss_enabled", False):
        problems.append("a router auxiliary loss (router_aux_loss_coef != 0)")
    return problems


class R1GRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is r1kernels' fused ``grpo_loss`` (see the module docstring): the same
    constructor, config and training loop; the loss is computed from the last hidden states and the LM head."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        problems = unsupported_options(self)
        if problems:
            raise ValueError("R1GRPOTrainer cannot run these GRPOConfig options: " + "; ".join(problems))
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        add_hidden_state_forward(model)

    def _policy_weight(self, inputs, hidden, weight, bias, mask, advantages):
        """The per-token factor on the policy term: vLLM's importance-sampling ratio and DeepSeek-V3.2's
        off-policy sequence mask, as TRL applies them (None when neither is on)."""
        completion_ids = inputs["completion_ids"]
        factor = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            factor = inputs["importance_sampling_ratio"].float().expand_as(completion_ids)
        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps", inputs.get("old_per_token_logps"))
            if sampling is not None:  # without either, the old policy is this one: every sequence stays
                with torch.no_grad():
                    logps = token_logprobs(hidden, weight, completion_ids, bias=bias, temperature=self.temperature)
                adv = advantages if advantages.dim() == 2 else advantages[:, None]
                keep = self.get_off_policy_mask(adv, logps, sampling, mask, self.off_policy_mask_threshold)
                keep = keep.expand_as(completion_ids).float()
                factor = keep if factor is None else factor * keep
        return factor

    def _global_mean(self, value: torch.Tensor, count: torch.Tensor) -> float:
        """A mean over every process's tokens (TRL's ``global_masked_mean``) from this process's mean."""
        totals = self.accelerator.reduce(torch.stack([value.detach().float() * count, count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        T = completion_ids.size(1)
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        attention_mask = torch.cat([prompt_mask, completion_mask], 1)
        with self.accelerator.autocast():
            hidden = model(input_ids=input_ids, attention_mask=attention_mask, r1k_last_hidden_state=True)
        hidden = hidden[:, -T - 1 : -1]  # the states that predict the completion tokens
        lm_head = self.accelerator.unwrap_model(model).get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        hidden = hidden.to(weight.device)
        if self.args.cast_lm_head_to_fp32:
            hidden, weight, bias = hidden.float(), weight.float(), None if bias is None else bias.float()
        else:
            hidden = hidden.to(weight.dtype)

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        advantages = inputs["advantages"]
        num_items = None
        if self.loss_type == "dapo":  # TRL: num_items spans the generation batch; one accumulation window here
            num_items = inputs["num_items_in_batch"].float()
            if mode == "train":
                num_items = num_items * accumulation / self.args.steps_per_generation
        loss, metrics = grpo_loss(
            hidden, weight, completion_ids, mask, advantages, bias=bias,
            old_logps=inputs.get("old_per_token_logps"),
            ref_logps=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, delta=self.args.delta,
            temperature=self.temperature, loss_type=self.loss_type, max_completion_length=self.max_completion_length,
            num_items_in_batch=num_items, num_processes=self.accelerator.num_processes,
            importance_sampling_level=self.importance_sampling_level,
            unbiased_kl=bool(getattr(self.args, "use_bias_correction_kl", False)),
            rollout_is_ratio=self._policy_weight(inputs, hidden.detach(), weight.detach(),
                                                 None if bias is None else bias.detach(), mask, advantages),
            return_entropy=True,
        )  # fmt: skip
        if self.loss_type != "dapo":  # TRL scales these for gradient accumulation itself
            loss = loss / accumulation

        tokens = mask.sum().float()
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(self._global_mean(metrics["kl"], tokens))
        self._metrics[mode]["entropy"].append(self._global_mean(metrics["entropy"], tokens))
        for ours, theirs in (("clip_ratio_low", "low_mean"), ("clip_ratio_high", "high_mean"),
                             ("clip_ratio", "region_mean")):  # fmt: skip
            self._metrics[mode][f"clip_ratio/{theirs}"].append(self._global_mean(metrics[ours], tokens))
        return loss
