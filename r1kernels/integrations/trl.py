"""TRL's GRPOTrainer with r1kernels' fused GRPO loss.

    from r1kernels.integrations.trl import R1GRPOTrainer

    trainer = R1GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=dataset)
    trainer.train()

    # or an existing trainer (a GRPOTrainer or a subclass of it), in place:
    apply_r1kernels_to_grpo_trainer(trainer)

TRL runs the model to per-token log-probs (its chunked PyTorch LM head) and computes the clipped surrogate, the
KL term and the normalisation on ``[B, T]`` tensors. Here the model's forward runs the backbone and hands the last
hidden states and the LM head to ``r1kernels.grpo.grpo_loss``, which computes the log-probs, the loss and their
gradients into the hidden states and the LM head in one fused op (Triton on a GPU, a blocked path on the CPU),
never materialising ``[tokens, vocab]``. The loss is computed inside the model's forward, as TRL's own fused head
is, so a DDP wrapper sees the LM head used by the forward (a head used after the forward fails under
``find_unused_parameters=True``, HF's default without activation checkpointing). As in TRL's head, an FSDP2
(DTensor) head is gathered with ``full_tensor()`` and a ZeRO-3 head with TRL's ``maybe_gather_lm_head_ctx``; those
two paths are not tested here. The old and reference log-probs TRL computes before the loss also go through
r1kernels (``token_logprobs``). Generation, rewards, advantages and logging stay TRL's. Precision follows TRL's head:
fp32 with ``cast_lm_head_to_fp32``, else autocast's dtype under mixed precision, else the head's dtype.

``GRPOConfig`` maps one to one: ``loss_type`` (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``luspo``),
``importance_sampling_level`` (``token``, ``sequence``), ``epsilon`` / ``epsilon_high``, ``delta``, ``beta`` with
``use_bias_correction_kl``, ``temperature``, ``max_completion_length``, the ``num_items_in_batch`` normalisation
under gradient accumulation and several processes, vLLM's importance-sampling correction,
``off_policy_mask_threshold`` and ``top_entropy_quantile`` (the last three fold into the per-token weight of the
policy term), and ``cast_lm_head_to_fp32``. Logged metrics are TRL's: ``kl``, ``entropy``,
``clip_ratio/{low,high,region}_mean``, ``clip_ratio/low_min`` and ``clip_ratio/high_max``.

The per-sequence clip metrics, the off-policy mask and the entropy mask need the current policy's per-token
log-probs or entropies before the loss: one extra no-grad ``token_logprobs`` pass over the LM head (2NHV FLOPs
next to the loss's 6NHV; still no logits). Set ``per_sequence_clip_metrics = False`` on the trainer to skip it
when neither mask is on: ``clip_ratio/low_min`` / ``high_max`` are then not logged, and with
``importance_sampling_level="sequence"`` the clip means are token-weighted rather than TRL's per-sequence means.

Options the fused loss does not express raise a ValueError naming them at construction: the ``cispo`` / ``sapo``
/ ``vespo`` losses, the entropy bonus, a router auxiliary loss, logit scaling or soft-capping in the model's
config, and sequence-level ratios under DeepSpeed ZeRO-3; a batch with multimodal inputs raises before the forward.
"""

from __future__ import annotations

import functools
import types

import torch

from r1kernels.grpo import grpo_loss, token_logprobs

try:
    from trl import GRPOTrainer
    from trl.trainer.utils import maybe_gather_lm_head_ctx, nanmax, nanmin
except ImportError as e:  # the [hf] extra is missing
    raise ImportError("r1kernels.integrations.trl needs trl>=1.16 (r1kernels[hf])") from e

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IS_LEVELS = ("token", "sequence")
# config fields with which the model scales or soft-caps its logits before the softmax (TRL's fused head applies
# them; grpo_loss does not)
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
MULTIMODAL_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                     "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")  # fmt: skip


def add_lm_head_hook(model: torch.nn.Module) -> None:
    """Let ``model(..., r1k_head=fn)`` run the backbone and return ``fn(last_hidden_state [B, L, H], lm_head)``.

    ``fn`` runs inside the model's forward, so a DDP / FSDP / ZeRO-3 wrapper around the model sees the LM head used
    by its forward. Without the keyword the forward is the previous one (generation is unchanged)."""
    if getattr(model, "_r1k_head_hook", False):
        return
    previous = model.forward

    @functools.wraps(type(model).forward)  # generate validates its kwargs against this signature
    def forward(self, *args, r1k_head=None, **kwargs):
        if r1k_head is None:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        return r1k_head(self.base_model(*args, **kwargs).last_hidden_state, self.get_output_embeddings())

    model.forward = types.MethodType(forward, model)
    model._r1k_head_hook = True


def unsupported_options(trainer: GRPOTrainer) -> list[str]:
    """The trainer's settings that the fused loss cannot reproduce (empty: every option maps)."""
    problems = []
    if trainer.loss_type not in LOSS_TYPES:
        problems.append(f"loss_type={trainer.loss_type!r} (supported: {', '.join(LOSS_TYPES)})")
    if trainer.importance_sampling_level not in IS_LEVELS:
        problems.append(f"importance_sampling_level={trainer.importance_sampling_level!r}")
    if getattr(trainer, "_entropy_bonus_enabled", False):
        problems.append("the entropy bonus (entropy_coef != 0 or adaptive entropy)")
    if getattr(trainer, "aux_loss_enabled", False):
        problems.append("a router auxiliary loss (router_aux_loss_coef != 0)")
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and (name == "final_logit_softcapping" or value != 1.0):
            problems.append(f"the model config's {name}={value} (grpo_loss applies no logit scaling or soft-capping)")
    if trainer.importance_sampling_level == "sequence":
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():  # the sequence-level loss re-reads the gathered LM head in its backward
            problems.append("importance_sampling_level='sequence' under DeepSpeed ZeRO-3")
    return problems


def _head_operands(hidden: torch.Tensor, lm_head: torch.nn.Module, cast_to_fp32: bool):
    """The LM head's weight and bias as the kernel must see them, and ``hidden`` in their dtype, at TRL's precision:
    fp32 with ``cast_lm_head_to_fp32``, else autocast's dtype when the forward runs under autocast."""
    weight, bias = lm_head.weight, lm_head.bias
    if hasattr(weight, "full_tensor"):  # an FSDP2 DTensor: gather the head once (differentiable)
        weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
    hidden = hidden.to(weight.device)  # with device_map the backbone can end on another device than the head
    if cast_to_fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        dtype = weight.dtype
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _on_lm_head(fn, hidden: torch.Tensor, lm_head: torch.nn.Module, cast_to_fp32: bool, *args):
    """``fn(hidden, weight, bias, *args)`` with the LM head gathered (ZeRO-3) while it is read, the operands at
    TRL's precision (``_head_operands``) and autocast off (the kernels pick their own accumulation precision)."""
    with maybe_gather_lm_head_ctx(lm_head.weight, lm_head.bias):
        hidden, weight, bias = _head_operands(hidden, lm_head, cast_to_fp32)
        with torch.autocast(hidden.device.type, enabled=False):
            return fn(hidden, weight, bias, *args)


class R1GRPOMixin:
    """The methods ``R1GRPOTrainer`` puts in front of ``trl.GRPOTrainer`` (see the module docstring)."""

    per_sequence_clip_metrics: bool = True

    def _r1k_setup(self) -> None:
        problems = unsupported_options(self)
        if problems:
            raise ValueError("R1GRPOTrainer cannot run these GRPOConfig options: " + "; ".join(problems))
        # TRL patches the PEFT base model's forward the same way; PEFT's forward passes the keyword through
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        add_lm_head_hook(model)
        if self.ref_model is not None:
            add_lm_head_hook(self.accelerator.unwrap_model(self.ref_model))

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):  # fmt: skip
        """TRL's old / reference log-probs (and entropies) through ``token_logprobs``; TRL's own path where a
        gradient is wanted, for the aux loss and for multimodal inputs."""
        hooked = getattr(self.accelerator.unwrap_model(model), "_r1k_head_hook", False)
        if torch.is_grad_enabled() or compute_aux_loss or not hooked or any(v is not None for v in multimodal.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal,
            )  # fmt: skip
        K = logits_to_keep
        cast = self.args.cast_lm_head_to_fp32

        def logprobs(hidden, weight, bias, ids):
            return token_logprobs(hidden, weight, ids.to(weight.device), self.temperature,
                                  return_entropy=compute_entropy, bias=bias)  # fmt: skip

        def head(hidden, lm_head, ids):
            return _on_lm_head(logprobs, hidden[:, -K - 1 : -1], lm_head, cast, ids)

        logps, entropies = [], []
        batch_size = batch_size or input_ids.size(0)
        for start in range(0, input_ids.size(0), batch_size):
            ids, att = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            with self.accelerator.autocast():
                out = model(input_ids=ids, attention_mask=att, r1k_head=functools.partial(head, ids=ids[:, -K:]))
            logp, entropy = out if compute_entropy else (out, None)
            padding = att[:, -K:].to(logp.device) == 0  # TRL scores only the completion's real tokens: 0 elsewhere
            logps.append(logp.masked_fill(padding, 0.0))
            if compute_entropy:
                entropies.append(entropy.masked_fill(padding, 0.0))
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _policy_factor(self, inputs, advantages, mask, probe) -> torch.Tensor | None:
        """The per-token factor on the policy term, as TRL applies each: vLLM's importance-sampling ratio,
        DeepSeek-V3.2's off-policy sequence mask and the high-entropy token mask (None when none is on)."""
        factors = []
        if self.use_vllm and self.vllm_importance_sampling_correction:
            factors.append(inputs["importance_sampling_ratio"].float())
        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps", inputs.get("old_per_token_logps"))
            if sampling is not None:  # without either, the old policy is this one: every sequence stays
                keep = self.get_off_policy_mask(advantages, probe[0], sampling, mask, self.off_policy_mask_threshold)
                factors.append(keep.float())
        if self.top_entropy_quantile < 1.0:
            factors.append(self.get_high_entropy_mask(probe[1], mask, 1 - self.top_entropy_quantile).float())
        if not factors:
            return None
        return functools.reduce(torch.mul, factors).expand(mask.shape).contiguous()

    def _global_mean(self, value: torch.Tensor, count: torch.Tensor) -> float:
        """A mean over every process's items (TRL's ``global_masked_mean``) from this process's mean and count."""
        totals = self.accelerator.reduce(torch.stack([value.detach().float() * count, count.float()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _log_clip_metrics(self, mode, inputs, advantages, mask, logp) -> None:
        """TRL's clip metrics from the current policy's per-token log-probs."""
        old = inputs.get("old_per_token_logps")
        log_ratio = logp - (logp if old is None else old)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
        ratio = torch.exp(log_ratio)
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        # one flag per sequence (sequence-level ratios and advantages): TRL averages over sequences, not tokens
        per_sequence = low.size(1) == 1
        count = torch.tensor(float(mask.size(0)), device=mask.device) if per_sequence else mask.sum().float()

        def mean(x):  # this process's mean over sequences or tokens
            return x.mean() if per_sequence else (x * mask).sum() / mask.sum().clamp(min=1.0)

        def seq_mean(x):  # each sequence's clipped fraction (NaN for an empty completion, as TRL's)
            return x.squeeze(1) if per_sequence else (x * mask).sum(-1) / mask.sum(-1)

        metrics = self._metrics[mode]
        for name, flags in (("low", low), ("high", high), ("region", low + high)):
            metrics[f"clip_ratio/{name}_mean"].append(self._global_mean(mean(flags), count))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(seq_mean(high))).item())

    def _fused_loss(self, hidden, weight, bias, inputs, mask, mode):
        """grpo_loss with the trainer's options, inside the model's forward (the LM head gathered, autocast off);
        also the current policy's per-token log-probs when a mask or the clip metrics need them."""
        ids, mask = inputs["completion_ids"].to(weight.device), mask.to(weight.device)
        advantages = inputs["advantages"].to(weight.device)
        advantages_2d = advantages if advantages.dim() == 2 else advantages[:, None]
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss_type, max_len, num_items = self.loss_type, self.max_completion_length, None
        if loss_type == "luspo":  # sum over each sequence's tokens, mean over sequences: dr_grpo with length 1
            loss_type, max_len = "dr_grpo", 1
        if loss_type == "dapo":  # TRL: num_items spans the generation batch; one accumulation window here
            num_items = inputs["num_items_in_batch"].float().clamp(min=1.0)
            if mode == "train":
                num_items = num_items * accumulation / self.args.steps_per_generation
        probe = None
        masks = self.off_policy_mask_threshold is not None or self.top_entropy_quantile < 1.0
        if masks or self.per_sequence_clip_metrics:
            with torch.no_grad():
                probe = token_logprobs(hidden, weight, ids, self.temperature, return_entropy=True, bias=bias)
        loss, metrics = grpo_loss(
            hidden, weight, ids, mask, advantages, bias=bias,
            old_logps=inputs.get("old_per_token_logps"),
            ref_logps=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, delta=self.args.delta,
            temperature=self.temperature, loss_type=loss_type, max_completion_length=max_len,
            num_items_in_batch=num_items, num_processes=self.accelerator.num_processes,
            importance_sampling_level=self.importance_sampling_level,
            unbiased_kl=bool(self.args.use_bias_correction_kl),
            rollout_is_ratio=self._policy_factor(inputs, advantages_2d, mask, probe),
            return_entropy=True,
        )  # fmt: skip
        if loss_type != "dapo":  # dapo's normaliser already covers accumulation; TRL divides the others
            loss = loss / accumulation
        return loss, metrics, None if probe is None else probe[0]

    def _compute_loss(self, model, inputs):
        present = [k for k in MULTIMODAL_INPUTS if inputs.get(k) is not None]
        if present:
            raise ValueError(f"R1GRPOTrainer supports text-only models; the batch holds {', '.join(present)}")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        T = completion_ids.size(1)
        advantages = inputs["advantages"]
        advantages_2d = advantages if advantages.dim() == 2 else advantages[:, None]
        mode = "train" if self.model.training else "eval"
        cast = self.args.cast_lm_head_to_fp32

        def head(hidden, lm_head):
            return _on_lm_head(self._fused_loss, hidden[:, -T - 1 : -1], lm_head, cast, inputs, mask, mode)

        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        attention_mask = torch.cat([prompt_mask, completion_mask], 1)
        with self.accelerator.autocast():
            loss, metrics, logp = model(input_ids=input_ids, attention_mask=attention_mask, r1k_head=head)

        tokens = mask.sum().float()
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(self._global_mean(metrics["kl"], tokens))
        self._metrics[mode]["entropy"].append(self._global_mean(metrics["entropy"], tokens))
        if logp is not None and self.per_sequence_clip_metrics:
            self._log_clip_metrics(mode, inputs, advantages_2d, mask.to(logp.device).float(), logp)
        else:  # grpo_loss's fractions of completion tokens (token-weighted at sequence level)
            for ours, theirs in (("clip_ratio_low", "low"), ("clip_ratio_high", "high"), ("clip_ratio", "region")):
                self._metrics[mode][f"clip_ratio/{theirs}_mean"].append(self._global_mean(metrics[ours], tokens))
        return loss


class R1GRPOTrainer(R1GRPOMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is r1kernels' fused ``grpo_loss`` (see the module docstring): the same
    constructor, config and training loop; the loss and the old / reference log-probs are computed from the last
    hidden states and the LM head. Raises ``ValueError`` naming any ``GRPOConfig`` option it cannot reproduce."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._r1k_setup()


@functools.cache
def _patched_class(cls: type) -> type:
    if cls is GRPOTrainer:
        return R1GRPOTrainer
    return type(f"R1{cls.__name__}", (R1GRPOMixin, cls), {"__doc__": f"{cls.__name__} with r1kernels' loss."})


def apply_r1kernels_to_grpo_trainer(trainer: GRPOTrainer) -> GRPOTrainer:
    """Switch an existing ``GRPOTrainer`` (or an instance of a subclass) to the fused loss, in place, before
    ``train()``: its class becomes a subclass of its own with ``R1GRPOMixin`` in front (so the mixin's
    ``_compute_loss`` and ``_get_per_token_logps_and_entropies`` replace the class's own). Returns the trainer.
    Raises ``ValueError`` naming the options the fused loss cannot reproduce (the trainer is then unchanged)."""
    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"trainer must be a trl.GRPOTrainer, got {type(trainer).__name__}")
    if isinstance(trainer, R1GRPOMixin):
        return trainer
    problems = unsupported_options(trainer)
    if problems:
        raise ValueError("apply_r1kernels_to_grpo_trainer cannot run these GRPOConfig options: " + "; ".join(problems))
    trainer.__class__ = _patched_class(type(trainer))
    trainer._r1k_setup()
    return trainer


__all__ = ["R1GRPOMixin", "R1GRPOTrainer", "add_lm_head_hook", "apply_r1kernels_to_grpo_trainer",
           "unsupported_options"]  # fmt: skip
