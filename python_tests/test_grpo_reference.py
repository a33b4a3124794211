"""The float64 reference itself, pinned to numbers worked out by hand: one sequence of two tokens over a
vocabulary of two, logits [x, 0] with x = 1 and x = 2 (hidden [[1], [2]], weight [[1], [0]]), so every
log-prob, ratio, clip and KL has a closed form."""

import math

import pytest
import torch

from r1kernels.grpo import reference as ref

X = (1.0, 2.0)
IDS = (0, 1)  # the first token picks the logit x, the second the logit 0


def _logp(x, i):
    """log softmax([x, 0])[i]"""
    return (x if i == 0 else 0.0) - math.log(math.exp(x) + 1.0)


def _dlogp_dh(x, i):
    """d log softmax([h * 1, h * 0])[i] / d h at h = x: onehot - p on the first logit, times its weight 1."""
    p0 = math.exp(x) / (math.exp(x) + 1.0)
    return (1.0 if i == 0 else 0.0) - p0


def _batch(B=1):
    hidden = torch.tensor([[[X[0]], [X[1]]]] * B, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    ids = torch.tensor([IDS] * B)
    logp = torch.tensor([[_logp(x, i) for x, i in zip(X, IDS, strict=True)]] * B, dtype=torch.float64)
    return hidden, weight, ids, logp


def _adv(a: float) -> torch.Tensor:
    return torch.tensor([a], dtype=torch.float64)


def close(a, b):
    return a == pytest.approx(b, rel=1e-12, abs=1e-15)


def test_logprobs_and_entropy():
    hidden, weight, ids, logp = _batch()
    got, entropy = ref.token_logprobs(hidden, weight, ids)
    p = [math.exp(x) / (math.exp(x) + 1) for x in X]
    for t in range(2):
        assert close(float(got[0, t]), float(logp[0, t]))
        assert close(float(entropy[0, t]), -(p[t] * math.log(p[t]) + (1 - p[t]) * math.log(1 - p[t])))


def test_positive_advantage_inside_the_clip_with_kl():
    hidden, weight, ids, logp = _batch()
    A, beta = 0.7, 0.05
    loss, metrics = ref.grpo_loss(hidden, weight, ids, torch.ones(1, 2), _adv(A), old_logps=logp - 0.1,
                                  ref_logps=logp + 0.3, beta=beta)  # fmt: skip
    r, k3 = math.exp(0.1), math.exp(0.3) - 0.3 - 1  # ratio 1.105 is inside [0.8, 1.2]
    assert close(float(loss), -A * r + beta * k3)  # the same on both tokens, mean over 2 then over 1 sequence
    assert close(float(metrics["kl"]), k3) and float(metrics["clip_ratio"]) == 0.0
    loss.backward()
    dloss_dlogp = 0.5 * (-A * r + beta * (1 - math.exp(0.3)))  # d k3 / d logp = -(exp(ref - logp) - 1)
    for t in range(2):
        assert close(float(hidden.grad[0, t, 0]), dloss_dlogp * _dlogp_dh(X[t], IDS[t]))


def test_negative_advantage_clipped_low_has_no_gradient():
    hidden, weight, ids, logp = _batch()
    A = -1.3
    loss, metrics = ref.grpo_loss(hidden, weight, ids, torch.ones(1, 2), _adv(A), old_logps=logp + 0.5)
    # ratio exp(-0.5) = 0.607 < 0.8 and A < 0: the objective is A * max(r, 0.8) = 0.8 A
    assert close(float(loss), -0.8 * A)
    assert float(metrics["clip_ratio_low"]) == 1.0 and float(metrics["clip_ratio_high"]) == 0.0
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_gspo_sequence_ratio():
    hidden, weight, ids, logp = _batch()
    A = 0.4
    # inside the clip: one ratio exp(mean(0.05, 0.15)) = exp(0.1) for the sequence, d log r / d logp_t = 1/2
    old = logp - torch.tensor([[0.05, 0.15]], dtype=torch.float64)
    loss, _ = ref.grpo_loss(hidden, weight, ids, torch.ones(1, 2), _adv(A),
                            old_logps=old, importance_sampling_level="sequence")  # fmt: skip
    assert close(float(loss), -A * math.exp(0.1))
    loss.backward()
    for t in range(2):
        assert close(float(hidden.grad[0, t, 0]), -A * math.exp(0.1) * 0.5 * _dlogp_dh(X[t], IDS[t]))
    # clipped: exp(mean(0.1, 0.3)) = exp(0.2) = 1.221 > 1.2, so both tokens take 1.2
    old = logp - torch.tensor([[0.1, 0.3]], dtype=torch.float64)
    loss, metrics = ref.grpo_loss(hidden, weight, ids, torch.ones(1, 2), _adv(A),
                                  old_logps=old, importance_sampling_level="sequence")  # fmt: skip
    assert close(float(loss), -1.2 * A) and float(metrics["clip_ratio_high"]) == 1.0
    token, _ = ref.grpo_loss(hidden, weight, ids, torch.ones(1, 2), _adv(A),
                             old_logps=old)  # fmt: skip
    assert close(float(token), -0.5 * A * (math.exp(0.1) + 1.2))  # token level: 0.1 inside, 0.3 clipped


def test_aggregations_over_masked_sequences():
    hidden, weight, ids, logp = _batch(B=2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # 3 completion tokens, 2 in the first sequence
    shift = torch.tensor([[0.1, 0.05], [0.15, 0.12]], dtype=torch.float64)  # each token its own ratio
    ell = [[-0.7 * math.exp(d) for d in row] for row in shift.tolist()]  # every token inside the clip
    masked_sum = ell[0][0] + ell[0][1] + ell[1][0]

    def loss(**kwargs):
        adv = torch.tensor([0.7, 0.7], dtype=torch.float64)
        return float(ref.grpo_loss(hidden, weight, ids, mask, adv, old_logps=logp - shift, **kwargs)[0])

    assert close(loss(loss_type="grpo"), ((ell[0][0] + ell[0][1]) / 2 + ell[1][0] / 1) / 2)
    assert close(loss(loss_type="bnpo"), masked_sum / 3)
    assert close(loss(loss_type="dr_grpo", max_completion_length=4), masked_sum / (2 * 4))
    assert close(loss(loss_type="dapo", num_items_in_batch=12.0, num_processes=2), masked_sum / 6)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    adv = ref.group_advantages(rewards, 2)
    s = math.sqrt(0.5)  # unbiased std of {0, 1}
    assert adv.tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4),
                                          0.5 / (s + 1e-4), 0.0, 0.0], rel=1e-12)  # fmt: skip


def test_entropy_bonus_lowers_the_loss():
    hidden, weight, ids, _ = _batch()
    p = [math.exp(x) / (math.exp(x) + 1) for x in X]
    ent = [-(q * math.log(q) + (1 - q) * math.log(1 - q)) for q in p]
    zero_adv = torch.zeros(1, dtype=torch.float64)
    loss, _ = ref.grpo_loss(hidden, weight, ids, torch.ones(1, 2), zero_adv, entropy_coef=0.01)
    assert close(float(loss), -0.01 * (ent[0] + ent[1]) / 2)
