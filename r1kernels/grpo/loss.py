"""The GRPO loss fused with the LM head.

The expensive part, the LM head and log-softmax over the vocabulary, runs in ``token_logprob_stats``
(Triton on the GPU, chunked PyTorch on the CPU) or, for training with token-level ratios, in the single-pass
``fused_loss`` op; neither holds the ``[tokens, vocab]`` logits. The per-token loss is written once
(``token_loss``), every aggregation is a per-token weight, and everything traces under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from r1kernels._checks import check_tensor
from r1kernels.grpo.fused_loss import fused_token_loss
from r1kernels.grpo.lm_head_logprobs import token_logprob_stats, token_logprobs
from r1kernels.grpo.token_loss import TokenTerms, aggregation_weights, token_kl, token_log_ratio, token_loss

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence", "sequence_token")


class _Segments:
    """Token layout: ``B`` sequences of a padded ``[B, T]`` batch, or packed rows split by ``cu_seqlens``."""

    def __init__(self, B: int, T: int | None, cu_seqlens: torch.Tensor | None, n_tokens: int):
        self.B, self.T, self.cu, self.N = B, T, cu_seqlens, n_tokens

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums of a per-token ``[N]`` tensor -> ``[B]`` (deterministic: no atomics)."""
        if self.cu is None:
            return x.view(self.B, self.T).sum(dim=1)
        csum = torch.cat([x.new_zeros(1, dtype=torch.float64), x.double().cumsum(0)])
        return (csum[self.cu[1:]] - csum[self.cu[:-1]]).to(x.dtype)

    def to_tokens(self, per_seq: torch.Tensor) -> torch.Tensor:
        """``[B]`` -> ``[N]``, each sequence's value on each of its tokens."""
        if self.cu is None:
            return per_seq[:, None].expand(self.B, self.T).reshape(-1)
        return torch.repeat_interleave(per_seq, self.cu[1:] - self.cu[:-1], output_size=self.N)


def _layout(hidden: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[_Segments, tuple[int, ...]]:
    """The token layout of ``hidden`` and the shape every per-token tensor must have."""
    if cu_seqlens is None:
        check_tensor("hidden", hidden, ndim=3)
        B, T, _ = hidden.shape
        seg, token_shape = _Segments(B, T, None, B * T), (B, T)
    else:
        check_tensor("hidden", hidden, ndim=2)
        check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32, torch.int64), ndim=1)
        N = hidden.shape[0]
        cu = cu_seqlens.long()
        if cu.numel() < 2:
            raise ValueError(f"cu_seqlens must hold B + 1 >= 2 offsets, got shape {tuple(cu.shape)}")
        _check_offsets(cu, N)
        seg, token_shape = _Segments(cu.numel() - 1, None, cu, N), (N,)
    if seg.B <= 0 or seg.N == 0:
        raise ValueError(f"empty batch: hidden has shape {tuple(hidden.shape)}")
    return seg, token_shape


def _check_offsets(cu: torch.Tensor, N: int) -> None:
    """Bad offsets would silently mix sequences. CPU tensors in eager mode: a host check with a clear error.
    CUDA tensors and torch.compile: a device-side assert, so there is no host synchronisation (CUDA graphs,
    ``fullgraph=True`` on packed input)."""
    ok = (cu[0] == 0) & (cu[-1] == N) & (cu[1:] >= cu[:-1]).all()
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(
                f"cu_seqlens must be non-decreasing offsets from 0 to N = {N} (B + 1 values), got {cu.tolist()[:8]}"
            )
        return
    torch._assert_async(ok, "cu_seqlens must be non-decreasing offsets from 0 to N (B + 1 values)")


def _wants_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _per_token(name: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    if t is None:
        return None
    check_tensor(name, t)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (one value per token), got {tuple(t.shape)}")
    return t.reshape(-1)


def grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    temperature: float = 1.0,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    num_processes: int = 1,
    importance_sampling_level: str = "token",
    rollout_is_ratio: torch.Tensor | None = None,
    return_entropy: bool = False,
    log_ratio_clamp: float = 20.0,
    entropy_coef: float = 0.0,
    unbiased_kl: bool = False,
    single_pass: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss from final hidden states and the LM-head weight, without materialising the logits.

    Per completion token (DeepSeekMath eq. 3; TRL's GRPOTrainer semantics)::

        logp  = log softmax((hidden @ weight.T + bias) / temperature)[token]
        r     = exp(clamp(logp - old_logps, -c, c))          # c = log_ratio_clamp; GSPO: per-sequence mean
        loss  = -min(min(r, delta) * A, clip(r, 1 - epsilon_low, 1 + epsilon_high) * A)
                * rollout_is_ratio + beta * (exp(d) - d - 1),  d = clamp(ref_logps - logp, -c, c)

    Layouts (all per-token tensors share one):
        padded: ``hidden [B, T, H]``; ``token_ids``, ``completion_mask``, ``old_logps``, ``ref_logps``,
        ``rollout_is_ratio`` ``[B, T]``; ``advantages [B]`` or ``[B, T]``.
        packed: ``hidden [N, H]`` with ``cu_seqlens [B + 1]`` int (sequence b is rows
        ``cu_seqlens[b]:cu_seqlens[b+1]``); per-token tensors ``[N]``; ``advantages [B]`` or ``[N]``.
    ``weight [V, H]`` and ``bias [V]`` share ``hidden``'s dtype (bf16 / fp16 / fp32); ids int64 / int32.

    Args:
        old_logps: the sampling policy's log-probs; None = on-policy (ratio 1, gradient still flows).
        ref_logps / (ref_hidden, ref_weight, ref_bias): the reference policy for the KL term (needed when
            beta > 0); ``ref_hidden`` (same layout as ``hidden``) runs through the fused kernel without
            gradients; ``ref_weight`` defaults to ``weight`` and then ``ref_bias`` to ``bias`` (the same LM head).
        loss_type: ``grpo`` (mean over each sequence's tokens, then over sequences), ``bnpo`` (mean over all
            completion tokens), ``dr_grpo`` (sum / (B * max_completion_length); default T for padded input,
            required for packed), ``dapo`` (sum / (num_items_in_batch / num_processes)). For ``dapo`` under
            gradient accumulation or data parallelism pass ``num_items_in_batch`` = completion tokens summed
            over every micro-batch and rank, and ``num_processes`` = ranks whose gradients are averaged;
            it defaults to this batch's token count.
        importance_sampling_level: ``token``, ``sequence`` (GSPO: one ratio per sequence from the mean
            token log-ratio) or ``sequence_token`` (GSPO-token: that ratio's value, each token's own gradient;
            differs from ``sequence`` only with per-token advantages).
        delta: optional upper clamp of the unclipped ratio (two-sided clipping).
        rollout_is_ratio: optional per-token importance weight from the rollout engine (e.g. vLLM's
            truncated importance sampling), multiplies the policy term.
        log_ratio_clamp: both log-ratios are clamped to ``[-c, c]`` before ``exp`` so neither the ratio nor
            the k3 KL can overflow to Inf/NaN; outside the clamp the gradient of that term is 0.
        entropy_coef: entropy bonus (verl's ``entropy_coeff``): ``- entropy_coef * entropy`` is added to each
            token's loss before aggregation; its gradient flows through the same fused backward.
        unbiased_kl: multiply each token's k3 by the importance ratio ``r`` (differentiable; the GSPO ratio at
            sequence level), which makes the KL gradient the unbiased reverse-KL one (DeepSeek-V3.2; TRL's
            ``use_bias_correction_kl``). The ``kl`` metric is then the weighted value too.
        single_pass: with token-level ratios and a gradient wanted, compute the gradients during this forward
            (``fused_loss``: 6NHV FLOPs on the GPU instead of 8NHV, at the cost of a larger logits scratch; on
            the CPU both passes run in this forward, 8NHV, measured faster there than a memory-bound 6NHV
            pass; the backward only scales them, and a second backward through the same graph raises). False: the
            two-pass path (forward statistics now, a recomputing backward later), as GSPO always uses.

    Returns:
        ``(loss, metrics)``: a scalar fp32 loss and 0-d fp32 tensors ``kl`` (masked mean k3; 0 without a
        reference), ``clip_ratio_low`` / ``clip_ratio_high`` / ``clip_ratio`` (fraction of completion tokens
        whose ratio is clipped, TRL's definition), and ``entropy`` (masked mean) when ``return_entropy``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got {importance_sampling_level!r}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if epsilon_low < 0 or epsilon_high < 0 or beta < 0 or log_ratio_clamp <= 0 or (delta is not None and delta <= 1):
        raise ValueError(
            "need epsilon_low, epsilon_high, beta >= 0, log_ratio_clamp > 0 and delta (if given) > 1; got "
            f"epsilon_low={epsilon_low}, epsilon_high={epsilon_high}, beta={beta}, "
            f"log_ratio_clamp={log_ratio_clamp}, delta={delta}"
        )
    seg, token_shape = _layout(hidden, cu_seqlens)
    B, T, H = seg.B, seg.T, hidden.shape[-1]
    if loss_type == "dr_grpo" and T is None and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' with packed input (cu_seqlens) needs max_completion_length")
    ids = _per_token("token_ids", token_ids, token_shape)
    mask = _per_token("completion_mask", completion_mask, token_shape).to(torch.float32)
    old = _per_token("old_logps", old_logps, token_shape)
    ref = _per_token("ref_logps", ref_logps, token_shape)
    is_ratio = _per_token("rollout_is_ratio", rollout_is_ratio, token_shape)
    check_tensor("advantages", advantages)
    if tuple(advantages.shape) == (B,):
        adv = seg.to_tokens(advantages.float())
    elif tuple(advantages.shape) == token_shape:
        adv = advantages.float().reshape(-1)
    else:
        raise ValueError(f"advantages must have shape ({B},) or {token_shape}, got {tuple(advantages.shape)}")
    if beta > 0 and ref is None:
        if ref_hidden is None:
            raise ValueError("beta > 0 needs the reference policy: pass ref_logps or ref_hidden (+ ref_weight)")
        if tuple(ref_hidden.shape) != tuple(hidden.shape):
            raise ValueError(
                f"ref_hidden must have hidden's shape {tuple(hidden.shape)}, got {tuple(ref_hidden.shape)}"
            )
        ref_w, ref_b = (
            (weight, bias if ref_bias is None else ref_bias) if ref_weight is None else (ref_weight, ref_bias)
        )
        ref = token_logprobs(ref_hidden.reshape(-1, H), ref_w, ids, temperature, bias=ref_b)

    n_tok = mask.sum().clamp(min=1.0)
    seq_count = seg.to_tokens(seg.seq_sum(mask))
    normaliser = n_tok if num_items_in_batch is None else num_items_in_batch / num_processes
    terms = TokenTerms(
        weight=aggregation_weights(mask, loss_type, seq_count, B, max_completion_length or T, normaliser),
        adv=adv, old=None if old is None else old.float(), ref=ref.float() if beta > 0 else None,
        is_ratio=None if is_ratio is None else is_ratio.float(), beta=beta, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, delta=delta, clamp=log_ratio_clamp, entropy_coef=entropy_coef,
        unbiased_kl=unbiased_kl,
    )  # fmt: skip
    with_entropy = return_entropy or entropy_coef != 0.0
    flat = hidden.reshape(-1, H)
    if importance_sampling_level == "token" and single_pass and _wants_grad(flat, weight, bias):
        loss, logp, entropy = fused_token_loss(flat, weight, bias, ids, terms, temperature, with_entropy)
        log_ratio = token_log_ratio(logp, terms.old, log_ratio_clamp)
    else:
        logp, _, entropy = token_logprob_stats(flat, weight, ids, bias=bias, temperature=temperature,
                                               return_entropy=with_entropy)  # fmt: skip
        log_ratio = token_log_ratio(logp, terms.old, log_ratio_clamp)
        if importance_sampling_level != "token":
            seq = seg.to_tokens(seg.seq_sum(log_ratio * mask)) / seq_count.clamp(min=1.0)  # GSPO: sequence mean
            # GSPO-token: the sequence ratio's value with each token's own gradient
            log_ratio = seq if importance_sampling_level == "sequence" else seq.detach() + (logp - logp.detach())
        loss = (terms.weight * token_loss(logp, entropy, log_ratio, terms)).sum()

    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).float() * mask
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).float() * mask
        kl = token_kl(logp, log_ratio, terms) if terms.ref is not None else None
        metrics = {
            "kl": torch.zeros((), device=logp.device) if kl is None else (kl * mask).sum() / n_tok,
            "clip_ratio_low": low.sum() / n_tok,
            "clip_ratio_high": high.sum() / n_tok,
            "clip_ratio": (low + high).sum() / n_tok,
        }
        if return_entropy:
            metrics["entropy"] = (entropy * mask).sum() / n_tok
    return loss, metrics
