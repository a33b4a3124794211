"""A minimal GRPO training loop on a verifiable task, built on r1kernels' fused GRPO ops.

Task: given two digits ``a, b`` the policy writes the two digits of ``a + b`` (tens, ones) and then
``<eos>``; the rule-based reward is the fraction of those three tokens that are right. The policy is a
small MLP over (a, b, position, previous token) whose final hidden state feeds an LM head, so the loss
path is exactly an LLM's: hidden states ``[B, T, H]`` + ``lm_head.weight [V, H]`` -> ``grpo_loss``.

Every step checks the ops against their references (``r1kernels.grpo.reference``, float64 on full
logits): old / reference log-probs, group advantages, the loss, its metrics and both gradients. A
mismatch stops training with an error.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from r1kernels.grpo import group_advantages, grpo_loss, token_logprobs
from r1kernels.grpo import reference as ref

EOS = 10
VOCAB = 11  # digits 0-9 and <eos>
T = 3  # tens, ones, <eos>


@dataclasses.dataclass
class Config:
    steps: int = 600
    prompts: int = 64  # prompts per step
    group: int = 8  # completions per prompt
    hidden: int = 128
    lr: float = 2e-3
    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    temperature: float = 1.2
    inner_steps: int = 2  # policy updates per batch of rollouts (the ratio moves off 1 from the second on)
    loss_type: str = "dapo"
    entropy_coef: float = 0.01  # entropy bonus, keeps exploring once the easy tokens are learned
    check_every: int = 5
    seed: int = 0
    device: str = "cpu"  # "cuda": the policy and the fused ops run on the GPU (Triton kernels)


class Policy(nn.Module):
    """MLP over one-hot (a, b, position, previous token) -> hidden state; ``lm_head`` maps it to the vocab."""

    def __init__(self, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10 + 10 + T + VOCAB + 1, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                  nn.GELU(), nn.Linear(hidden, hidden), nn.LayerNorm(hidden))  # fmt: skip
        self.lm_head = nn.Linear(hidden, VOCAB, bias=False)

    def hidden_states(self, a: torch.Tensor, b: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
        """``[B]`` digits and ``[B, T]`` completion tokens -> ``[B, T, H]`` hidden states (teacher-forced)."""
        Bn = a.shape[0]
        bos = torch.full((Bn, 1), VOCAB, dtype=torch.long, device=a.device)  # BOS = VOCAB
        prev = torch.cat([bos, completion[:, :-1]], dim=1)
        feats = torch.cat([
            nn.functional.one_hot(a, 10)[:, None].expand(Bn, T, 10),
            nn.functional.one_hot(b, 10)[:, None].expand(Bn, T, 10),
            torch.eye(T, device=a.device)[None].expand(Bn, T, T),
            nn.functional.one_hot(prev, VOCAB + 1),
        ], dim=-1).float()  # fmt: skip
        return self.body(feats)

    @torch.no_grad()
    def sample(self, a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
        completion = torch.zeros(a.shape[0], T, dtype=torch.long, device=a.device)
        for t in range(T):
            logits = self.hidden_states(a, b, completion)[:, t] @ self.lm_head.weight.T
            completion[:, t] = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(1)
        return completion


def reward(a: torch.Tensor, b: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    target = torch.stack([(a + b) // 10, (a + b) % 10, torch.full_like(a, EOS)], dim=1)
    return (completion == target).float().mean(dim=1)


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative error; a reference below 1e-4 in norm counts as 1e-4 (a batch whose advantages are all 0 has a
    near-zero gradient, where fp32 round-off alone is a large relative error)."""
    return float((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-4))


def _check(name: str, err: float, tol: float) -> float:
    if not err <= tol:  # also catches NaN
        raise RuntimeError(f"{name} differs from its reference: relative error {err:.3e} > {tol:g}")
    return err


def train(cfg: Config, log=print) -> dict[str, float]:
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    policy, ref_policy = Policy(cfg.hidden).to(dev), Policy(cfg.hidden).to(dev)
    ref_policy.load_state_dict(policy.state_dict())
    ref_policy.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    n = cfg.prompts * cfg.group
    first_reward, worst_check, t0 = None, 0.0, time.perf_counter()
    log(f"{'step':>5} {'reward':>7} {'loss':>9} {'kl':>8} {'clip':>6} {'entropy':>7} {'max ref err':>11}")
    for step in range(cfg.steps):
        a = torch.randint(0, 10, (cfg.prompts,), device=dev).repeat_interleave(cfg.group)
        b = torch.randint(0, 10, (cfg.prompts,), device=dev).repeat_interleave(cfg.group)
        completion = policy.sample(a, b, cfg.temperature)
        rewards = reward(a, b, completion)
        adv = group_advantages(rewards, cfg.group)
        mask = torch.ones(n, T, device=dev)
        check = step % cfg.check_every == 0
        with torch.no_grad():
            h_old = policy.hidden_states(a, b, completion)
            h_ref = ref_policy.hidden_states(a, b, completion)
            old_logps = token_logprobs(h_old, policy.lm_head.weight, completion, cfg.temperature)
            ref_logps = token_logprobs(h_ref, ref_policy.lm_head.weight, completion, cfg.temperature)
        errs = []
        if check:
            errs.append(_check("group_advantages", _rel(adv, ref.group_advantages(rewards, cfg.group)), 1e-5))
            r_old, _ = ref.token_logprobs(h_old, policy.lm_head.weight.detach(), completion, None, cfg.temperature)
            # absolute: confident tokens have logp near 0, where a relative error means nothing
            errs.append(_check("token_logprobs", float((old_logps.double() - r_old).abs().max()), 1e-5))
        kwargs = dict(old_logps=old_logps, ref_logps=ref_logps, beta=cfg.beta, epsilon_low=cfg.epsilon_low,
                      epsilon_high=cfg.epsilon_high, temperature=cfg.temperature, loss_type=cfg.loss_type,
                      entropy_coef=cfg.entropy_coef)  # fmt: skip
        for _ in range(cfg.inner_steps):
            hidden = policy.hidden_states(a, b, completion)
            hidden.retain_grad()
            loss, metrics = grpo_loss(hidden, policy.lm_head.weight, completion, mask, adv, return_entropy=True,
                                      **kwargs)  # fmt: skip
            opt.zero_grad()
            loss.backward()
            if check:
                errs += _reference_check(hidden, policy.lm_head.weight, completion, mask, adv, loss, metrics, kwargs)
            opt.step()
        worst_check = max([worst_check, *errs])
        mean_reward = float(rewards.mean())
        first_reward = mean_reward if first_reward is None else first_reward
        if step % 10 == 0 or step == cfg.steps - 1:
            checked = f"{max(errs):>11.2e}" if errs else f"{'not checked':>11}"
            log(f"{step:>5} {mean_reward:>7.3f} {float(loss.detach()):>9.4f} {float(metrics['kl']):>8.5f} "
                f"{float(metrics['clip_ratio']):>6.3f} {float(metrics['entropy']):>7.3f} {checked}")  # fmt: skip
    final = float(reward(a, b, policy.sample(a, b, 0.01)).mean())  # greedy accuracy on the last prompts
    summary = {"first_reward": first_reward, "last_reward": mean_reward, "greedy_reward": final,
               "worst_reference_error": worst_check, "seconds": time.perf_counter() - t0}  # fmt: skip
    log(f"reward {first_reward:.3f} -> {mean_reward:.3f} (greedy {final:.3f}) in {summary['seconds']:.1f} s; "
        f"every op matched its reference (worst relative error {worst_check:.1e})")  # fmt: skip
    return summary


def _reference_check(hidden, weight, completion, mask, adv, loss, metrics, kwargs) -> list[float]:
    """Recompute the loss on full float64 logits and compare loss, metrics and both gradients."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    r_loss, r_metrics = ref.grpo_loss(h, w, completion, mask, adv, **kwargs)
    r_loss.backward()
    loss, r_loss = float(loss.detach()), float(r_loss.detach())
    errs = [_check("grpo_loss", abs(loss - r_loss) / max(1.0, abs(r_loss)), 1e-5)]
    for k in ("kl", "entropy"):
        r = float(r_metrics[k].detach())
        errs.append(_check(f"metric {k}", abs(float(metrics[k]) - r) / max(1.0, abs(r)), 1e-4))
    # a clip decision can flip for a ratio within fp32 rounding of the boundary: allow one token
    _check("metric clip_ratio", abs(float(metrics["clip_ratio"]) - float(r_metrics["clip_ratio"])), 1.01 / mask.numel())
    # fp32 against float64: once the policy is confident, d logits are small terms that cancel in the GEMMs
    errs.append(_check("d hidden", _rel(hidden.grad, h.grad), 1e-3))
    errs.append(_check("d lm_head.weight", _rel(weight.grad, w.grad), 1e-3))
    return errs
