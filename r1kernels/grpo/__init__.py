"""GRPO: the loss fused with the LM head, token log-probs for old / reference policies, advantages."""

from r1kernels.grpo.advantages import group_advantages
from r1kernels.grpo.lm_head_logprobs import token_logprob_stats, token_logprobs
from r1kernels.grpo.loss import grpo_loss

__all__ = ["group_advantages", "grpo_loss", "token_logprob_stats", "token_logprobs"]
