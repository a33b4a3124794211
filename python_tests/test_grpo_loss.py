"""grpo_loss: every loss type x importance level x optional term against the float64 full-logits reference
(loss, metrics, d hidden, d weight), packed vs padded layouts, masked rows, overflow-proof log-ratios,
torch.compile, and input errors. The loss math is backend-independent O(tokens) PyTorch, so the full
matrix runs on the CPU path and a representative slice runs the Triton kernels."""

import itertools
import math

import pytest
import torch

import r1kernels
from r1kernels.grpo import group_advantages, grpo_loss
from r1kernels.grpo import reference as ref

B, T, H, V = 4, 6, 32, 150


def _batch(dtype=torch.float32, device="cpu", mask_row=True):
    hidden = torch.randn(B, T, H).to(dtype).to(device)
    weight = (torch.randn(V, H) * H**-0.5 * 2).to(dtype).to(device)
    ids = torch.randint(0, V, (B, T), device=device)
    mask = (torch.rand(B, T, device=device) > 0.25).float()
    mask[:, 0] = 1.0
    if mask_row:
        mask[2] = 0.0  # a sequence with no completion tokens
    true_logp, _ = ref.token_logprobs(hidden.cpu(), weight.cpu(), ids.cpu())
    # old / ref near the current policy, some far enough to be clipped
    old = (true_logp + 0.3 * torch.randn(B, T, dtype=torch.float64)).float().to(device)
    refp = (true_logp + 0.2 * torch.randn(B, T, dtype=torch.float64)).float().to(device)
    adv = torch.randn(B, device=device)
    return hidden, weight, ids, mask, adv, old, refp


def _check(kwargs, dtype=torch.float32, device="cpu", backend="cpu", tol=None, batch=None):
    hidden, weight, ids, mask, adv, old, refp = batch or _batch(dtype, device)
    extra = {}
    if kwargs.pop("old", False):
        extra["old_logps"] = old
    if kwargs.pop("ref", False):
        extra["ref_logps"] = refp
        extra["beta"] = 0.04
    if kwargs.pop("rollout", False):
        extra["rollout_is_ratio"] = torch.rand(B, T, device=device) * 0.5 + 0.75
    if kwargs.pop("token_adv", False):
        adv = torch.randn(B, T, device=device)
    kwargs = {**kwargs, **extra}
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with r1kernels.use_backend(backend):
        loss, metrics = grpo_loss(h, w, ids, mask, adv, return_entropy=True, **kwargs)
        loss.backward()
    rh = hidden.detach().double().cpu().requires_grad_()
    rw = weight.detach().double().cpu().requires_grad_()
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    r_loss, r_metrics = ref.grpo_loss(rh, rw, ids.cpu(), mask.cpu(), adv.cpu(), **cpu)
    r_loss.backward()
    if tol is None:
        tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert loss.dtype == torch.float32 and loss.dim() == 0
    got, want = float(loss.detach()), float(r_loss.detach())
    assert abs(got - want) <= tol * max(1.0, abs(want)), (got, want)
    for k, v in r_metrics.items():
        assert abs(float(metrics[k]) - float(v)) <= max(tol, 1e-6) * max(1.0, abs(float(v))), k
    for name, g, r in (("d hidden", h.grad, rh.grad), ("d weight", w.grad, rw.grad)):
        assert g is not None and not torch.isnan(g).any()
        err = float((g.double().cpu() - r).norm() / r.norm().clamp_min(1e-30))
        assert err < max(tol, 1e-5) * 10, f"{name}: {err:.2e}"
    return loss, metrics


OPTIONS = [
    dict(zip(("old", "ref", "delta", "rollout"), combo, strict=True))
    for combo in itertools.product([False, True], repeat=4)
]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(k for k, v in o.items() if v) or "plain")
def test_loss_matrix_cpu(loss_type, level, opts):
    kwargs = {"loss_type": loss_type, "importance_sampling_level": level, "epsilon_high": 0.28}
    kwargs.update({k: True for k in ("old", "ref", "rollout") if opts[k]})
    if opts["delta"]:
        kwargs["delta"] = 1.3
    if loss_type == "dr_grpo":
        kwargs["max_completion_length"] = 8
    if loss_type == "dapo":
        kwargs.update(num_items_in_batch=40.0, num_processes=2)
    _check(kwargs)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_triton_kernels(kernel_device, loss_type, level, dtype):
    _check({"loss_type": loss_type, "importance_sampling_level": level, "old": True, "ref": True, "delta": 1.5},
           dtype=dtype, device=kernel_device, backend="triton")  # fmt: skip


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_entropy_bonus(kernel_device, backend, loss_type):
    device = kernel_device if backend == "triton" else "cpu"
    _check({"loss_type": loss_type, "old": True, "ref": True, "entropy_coef": 0.01}, device=device, backend=backend)


def test_bf16_cpu_and_per_token_advantages():
    _check({"loss_type": "bnpo", "old": True, "token_adv": True}, dtype=torch.bfloat16, tol=2e-2)


def test_gspo_token_differs_from_gspo_only_with_per_token_advantages():
    hidden, weight, ids, mask, adv, old, _ = _batch()
    for advantages, same in ((adv, True), (torch.randn(B, T), False)):
        grads = []
        for level in ("sequence", "sequence_token"):
            w = weight.clone().requires_grad_()
            loss, _ = grpo_loss(hidden, w, ids, mask, advantages, old_logps=old, importance_sampling_level=level)
            loss.backward()
            grads.append(w.grad)
        assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7) == same
    _check({"loss_type": "grpo", "old": True, "token_adv": True, "importance_sampling_level": "sequence_token"})


def test_metrics_count_clipped_tokens():
    hidden, weight, ids, mask, _, _, _ = _batch(mask_row=False)
    logp, _ = ref.token_logprobs(hidden, weight, ids)
    old = (logp - 1.0).float()  # ratio e > 1.28 everywhere
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    _, metrics = grpo_loss(hidden, weight, ids, mask, adv, old_logps=old, epsilon_high=0.28)
    pos = (mask * (adv[:, None] > 0)).sum() / mask.sum()
    assert float(metrics["clip_ratio_high"]) == pytest.approx(float(pos))
    assert float(metrics["clip_ratio_low"]) == 0.0
    assert float(metrics["clip_ratio"]) == pytest.approx(float(pos))


def test_huge_log_ratios_do_not_overflow():
    hidden, weight, ids, mask, adv, old, refp = _batch()
    batch = (hidden, weight, ids, mask, adv, old - 200.0, refp + 500.0)
    loss, metrics = _check({"old": True, "ref": True, "loss_type": "bnpo"}, batch=batch)
    assert torch.isfinite(loss) and torch.isfinite(metrics["kl"])


def test_packed_layout_matches_padded():
    hidden, weight, ids, mask, adv, old, refp = _batch()
    lengths = torch.tensor([6, 3, 5, 1])  # packed rows are each sequence's first `length` tokens
    keep = torch.arange(T)[None, :] < lengths[:, None]
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for level in ("token", "sequence"):
            common = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                          max_completion_length=T)  # fmt: skip
            padded, pm = grpo_loss(hidden, weight, ids, mask * keep, adv, old_logps=old, ref_logps=refp, **common)
            packed, km = grpo_loss(hidden[keep], weight, ids[keep], mask[keep], adv, cu_seqlens=cu,
                                   old_logps=old[keep], ref_logps=refp[keep], **common)  # fmt: skip
            assert float(packed) == pytest.approx(float(padded), rel=1e-5, abs=1e-7), (loss_type, level)
            for k in pm:
                assert float(km[k]) == pytest.approx(float(pm[k]), rel=1e-5, abs=1e-7)


def test_ref_hidden_equals_ref_logps():
    hidden, weight, ids, mask, adv, old, _ = _batch()
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    ref_logps, _ = ref.token_logprobs(ref_hidden, weight, ids)
    a, am = grpo_loss(hidden, weight, ids, mask, adv, old_logps=old, ref_hidden=ref_hidden, beta=0.1)
    b, bm = grpo_loss(hidden, weight, ids, mask, adv, old_logps=old, ref_logps=ref_logps.float(), beta=0.1)
    assert float(a) == pytest.approx(float(b), rel=1e-5) and float(am["kl"]) == pytest.approx(float(bm["kl"]), rel=1e-4)


def test_ref_hidden_keeps_the_lm_head_bias():
    """The reference policy shares the LM head, bias included, unless another one is given."""
    hidden, weight, ids, mask, adv, old, _ = _batch()
    bias = torch.randn(V)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    with_bias, _ = ref.token_logprobs(ref_hidden, weight, ids, bias)
    common = dict(bias=bias, old_logps=old, beta=0.1)
    _, am = grpo_loss(hidden, weight, ids, mask, adv, ref_hidden=ref_hidden, **common)
    _, bm = grpo_loss(hidden, weight, ids, mask, adv, ref_logps=with_bias.float(), **common)
    assert float(am["kl"]) == pytest.approx(float(bm["kl"]), rel=1e-4)
    other = torch.randn(V)
    _, cm = grpo_loss(hidden, weight, ids, mask, adv, ref_hidden=ref_hidden, ref_bias=other, **common)
    r_other, _ = ref.token_logprobs(ref_hidden, weight, ids, other)
    _, dm = grpo_loss(hidden, weight, ids, mask, adv, ref_logps=r_other.float(), **common)
    assert float(cm["kl"]) == pytest.approx(float(dm["kl"]), rel=1e-4)


def test_torch_compile_fullgraph():
    hidden, weight, ids, mask, adv, old, refp = _batch()

    def step(h, w):
        loss, metrics = grpo_loss(h, w, ids, mask, adv, old_logps=old, ref_logps=refp, beta=0.04,
                                  loss_type="dapo", return_entropy=True)  # fmt: skip
        return loss, metrics["kl"], metrics["entropy"]

    compiled = torch.compile(step, fullgraph=True)  # inductor: the fused op stays opaque, the rest is generated
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out_c, out_e = compiled(h1, w1), step(h2, w2)
    out_c[0].backward()
    out_e[0].backward()
    for a, b in zip(out_c, out_e, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-6, atol=1e-7)
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"loss_type": "ppo"}, "loss_type must be one of"),
        ({"importance_sampling_level": "batch"}, "importance_sampling_level must be one of"),
        ({"beta": 0.1}, "beta > 0 needs the reference policy"),
        ({"epsilon_low": -0.1}, "epsilon_low"),
        ({"delta": 0.5}, "delta"),
        ({"advantages": torch.randn(3)}, "advantages must have shape"),
        ({"completion_mask": torch.ones(B, T + 1)}, "completion_mask must have shape"),
        ({"old_logps": torch.zeros(B)}, "old_logps must have shape"),
        ({"hidden": torch.randn(B * T, H)}, "hidden must be 3-D"),
        ({"hidden": torch.randn(0, T, H)}, "empty batch"),
        ({"cu_seqlens": torch.tensor([0, 24]), "hidden": torch.randn(24, H), "token_ids": torch.zeros(24).long(),
          "completion_mask": torch.ones(24), "advantages": torch.ones(1), "loss_type": "dr_grpo"},
         "needs max_completion_length"),
        ({"cu_seqlens": torch.tensor([0, 10, 8, 24]), "hidden": torch.randn(24, H), "token_ids": torch.zeros(24).long(),
          "completion_mask": torch.ones(24), "advantages": torch.ones(3)}, "cu_seqlens must be non-decreasing"),
        ({"cu_seqlens": torch.tensor([0, 10, 20]), "hidden": torch.randn(24, H), "token_ids": torch.zeros(24).long(),
          "completion_mask": torch.ones(24), "advantages": torch.ones(2)}, "from 0 to N = 24"),
    ],
)  # fmt: skip
def test_bad_input(kwargs, match):
    hidden, weight, ids, mask, adv, _, _ = _batch()
    args = {"hidden": hidden, "weight": weight, "token_ids": ids, "completion_mask": mask, "advantages": adv}
    args.update(kwargs)
    with pytest.raises((TypeError, ValueError), match=match):
        grpo_loss(**args)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages(scale):
    rewards = torch.randn(12)
    rewards[4:8] = 1.0  # a group whose rewards are all equal
    adv = group_advantages(rewards, 4, scale)
    expected = ref.group_advantages(rewards, 4, scale)
    assert torch.allclose(adv.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(adv[4:8], torch.zeros(4))


def test_group_advantages_errors_and_single_sample():
    assert torch.equal(group_advantages(torch.tensor([3.0, 5.0]), 1), torch.zeros(2))
    with pytest.raises(ValueError, match="group_size must be a positive int dividing"):
        group_advantages(torch.randn(10), 4)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(torch.randn(8), 4, "rank")
    with pytest.raises(TypeError, match="rewards must be a floating-point"):
        group_advantages(torch.arange(8), 4)
    assert torch.isnan(group_advantages(torch.tensor([1.0, float("nan")]), 2)).all()  # NaN propagates


def test_dapo_gradient_accumulation_matches_the_whole_batch():
    """Micro-batches normalised by the global token count sum to the whole batch's loss and gradients,
    the normalisation users get wrong under gradient accumulation."""
    hidden, weight, ids, mask, adv, old, refp = _batch()
    common = dict(beta=0.04, loss_type="dapo")
    w_full = weight.clone().requires_grad_()
    full, _ = grpo_loss(hidden, w_full, ids, mask, adv, old_logps=old, ref_logps=refp, **common)
    full.backward()
    w_acc = weight.clone().requires_grad_()
    total = float(mask.sum())
    parts = []
    for s in (slice(0, 1), slice(1, B)):
        part, _ = grpo_loss(hidden[s], w_acc, ids[s], mask[s], adv[s], old_logps=old[s], ref_logps=refp[s],
                            num_items_in_batch=total, **common)  # fmt: skip
        part.backward()
        parts.append(float(part))
    assert sum(parts) == pytest.approx(float(full), rel=1e-5)
    assert torch.allclose(w_acc.grad, w_full.grad, rtol=1e-4, atol=1e-7)


# The reference itself, pinned to numbers worked out by hand (test_grpo_reference.py pins the plain cases; these
# pin the sides of the clip PPO leaves open, delta, the rollout weight, bias and temperature, GSPO-token's
# gradient and the log-ratio clamp). One sequence of two tokens over a vocabulary of two: hidden [[1], [2]],
# weight [[1], [0]], bias [0.3, -0.2], temperature 0.7, ids [0, 1], so token t's logits are
# z = [(x_t + 0.3) / 0.7, -0.2 / 0.7] and its log-prob, entropy and d logp / d hidden have closed forms.
HAND_X, HAND_IDS, HAND_BIAS, HAND_TAU = (1.0, 2.0), (0, 1), (0.3, -0.2), 0.7


def _hand_probs(t):
    """softmax(z) of token t, as (p0, p1)."""
    z0, z1 = (HAND_X[t] + HAND_BIAS[0]) / HAND_TAU, HAND_BIAS[1] / HAND_TAU
    p0 = 1.0 / (1.0 + math.exp(z1 - z0))
    return p0, 1.0 - p0


def _hand_logp(t):
    """log softmax(z)[id_t] = z[id_t] - log(exp(z0) + exp(z1))."""
    z = ((HAND_X[t] + HAND_BIAS[0]) / HAND_TAU, HAND_BIAS[1] / HAND_TAU)
    return z[HAND_IDS[t]] - math.log(math.exp(z[0]) + math.exp(z[1]))


def _hand_dlogp_dh(t):
    """d logp_t / d hidden_t = sum_v (onehot - p)_v * weight[v] / tau = ([id_t == 0] - p0) * 1 / tau."""
    return ((1.0 if HAND_IDS[t] == 0 else 0.0) - _hand_probs(t)[0]) / HAND_TAU


def _hand_inputs():
    hidden = torch.tensor([[[HAND_X[0]], [HAND_X[1]]]], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    bias = torch.tensor(HAND_BIAS, dtype=torch.float64)
    logp = torch.tensor([[_hand_logp(0), _hand_logp(1)]], dtype=torch.float64)
    return hidden, weight, torch.tensor([HAND_IDS]), bias, logp


def _exact(got, want):
    return float(torch.as_tensor(got).detach()) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_reference_by_hand_open_sides_of_the_clip_delta_rollout_weight_and_kl():
    """Token level, per-token advantages A = [-0.5, 0.8], clip range [0.8, 1.28]. Token 0: r = e^0.4 = 1.49 above
    the range with A < 0; token 1: r = e^-0.5 = 0.61 below it with A > 0. Both are the side PPO's pessimism
    leaves unclipped (objective A * r, full gradient), neither counts as clipped in TRL's metrics. Rollout
    weights w = [0.9, 1.1] scale the policy term only; beta = 0.05 with ref = logp + 0.3 adds k3 = e^0.3 - 1.3."""
    hidden, weight, ids, bias, logp = _hand_inputs()
    A, log_r, w, beta = (-0.5, 0.8), (0.4, -0.5), (0.9, 1.1), 0.05
    r = [math.exp(x) for x in log_r]
    k3 = math.exp(0.3) - 0.3 - 1
    dk3_dlogp = 1 - math.exp(0.3)  # d/d logp of e^d - d - 1 with d = ref - logp
    common = dict(bias=bias, temperature=HAND_TAU, old_logps=logp - torch.tensor([log_r], dtype=torch.float64),
                  ref_logps=logp + 0.3, beta=beta, epsilon_low=0.2, epsilon_high=0.28,
                  rollout_is_ratio=torch.tensor([w], dtype=torch.float64))  # fmt: skip
    adv = torch.tensor([A], dtype=torch.float64)
    entropy = [-sum(p * math.log(p) for p in _hand_probs(t)) for t in range(2)]

    loss, metrics = ref.grpo_loss(hidden, weight, ids, torch.ones(1, 2), adv, **common)
    # grpo: the mean over the sequence's 2 tokens of -A_t r_t w_t + beta k3
    assert _exact(loss, sum(-A[t] * r[t] * w[t] + beta * k3 for t in range(2)) / 2)
    assert float(metrics["clip_ratio_low"]) == float(metrics["clip_ratio_high"]) == float(metrics["clip_ratio"]) == 0
    assert _exact(metrics["kl"], k3) and _exact(metrics["entropy"], (entropy[0] + entropy[1]) / 2)
    loss.backward()
    for t in range(2):
        assert _exact(hidden.grad[0, t, 0], (-A[t] * r[t] * w[t] + beta * dk3_dlogp) / 2 * _hand_dlogp_dh(t))

    # delta caps token 0's unclipped ratio before the case analysis, the clip still reads the raw ratio (TRL):
    # delta = 1.3: A * max(min(1.49, 1.3), clip(1.49)) = A * max(1.3, 1.28) = 1.3 A; delta = 1.25 (below
    # 1 + eps_high): A * max(1.25, 1.28) = 1.28 A. Both constants (no policy gradient on token 0); token 1's
    # r = 0.61 is under either cap and unchanged.
    for delta, objective_ratio in ((1.3, 1.3), (1.25, 1.28)):
        hidden.grad = None
        loss, _ = ref.grpo_loss(hidden, weight, ids, torch.ones(1, 2), adv, delta=delta, **common)
        assert _exact(loss, (-A[0] * objective_ratio * w[0] - A[1] * r[1] * w[1] + 2 * beta * k3) / 2), delta
        loss.backward()
        assert _exact(hidden.grad[0, 0, 0], beta * dk3_dlogp / 2 * _hand_dlogp_dh(0)), delta
        assert _exact(hidden.grad[0, 1, 0], (-A[1] * r[1] * w[1] + beta * dk3_dlogp) / 2 * _hand_dlogp_dh(1)), delta


def test_reference_by_hand_gspo_token_gradient_and_log_ratio_clamp():
    """GSPO: token log-ratios [0.05, 0.15] give the sequence ratio s = e^0.1 = 1.105 (inside [0.8, 1.2]) on both
    tokens, so with per-token advantages A = [0.4, -0.6] the loss is mean(-A_t s) = 0.1 s at both levels. The
    gradients differ: ``sequence`` differentiates s (d log s / d logp_t = 1/2), so d loss / d logp_t =
    sum_u (-A_u / 2) s / 2 = 0.05 s on both tokens; ``sequence_token`` gives token t its own -A_t s / 2."""
    hidden, weight, ids, bias, logp = _hand_inputs()
    adv = torch.tensor([[0.4, -0.6]], dtype=torch.float64)
    old = logp - torch.tensor([[0.05, 0.15]], dtype=torch.float64)
    s = math.exp(0.1)
    for level, dloss_dlogp in (("sequence", (0.05 * s, 0.05 * s)), ("sequence_token", (-0.2 * s, 0.3 * s))):
        hidden.grad = None
        loss, metrics = ref.grpo_loss(hidden, weight, ids, torch.ones(1, 2), adv, bias=bias, temperature=HAND_TAU,
                                      old_logps=old, importance_sampling_level=level)  # fmt: skip
        assert _exact(loss, 0.1 * s) and float(metrics["clip_ratio"]) == 0.0, level
        loss.backward()
        for t in range(2):
            assert _exact(hidden.grad[0, t, 0], dloss_dlogp[t] * _hand_dlogp_dh(t)), (level, t)

    # log_ratio_clamp c = 2: the policy log-ratios [3, -3] and the KL's d = ref - logp = [3, -3] are cut to
    # [2, -2]. Token 0 (A = -0.5, r = e^2 above the clip, open side): objective A e^2, k3 = e^2 - 2 - 1.
    # Token 1 (A = 0.8, r = e^-2 below the clip, open side): objective A e^-2, k3 = e^-2 + 2 - 1.
    # Every term sits outside its clamp, so the gradient is exactly 0.
    hidden.grad = None
    beta = 0.05
    shift = torch.tensor([[3.0, -3.0]], dtype=torch.float64)
    adv = torch.tensor([[-0.5, 0.8]], dtype=torch.float64)
    loss, metrics = ref.grpo_loss(hidden, weight, ids, torch.ones(1, 2), adv, bias=bias, temperature=HAND_TAU,
                                  old_logps=logp - shift, ref_logps=logp + shift, beta=beta,
                                  log_ratio_clamp=2.0)  # fmt: skip
    k3 = (math.exp(2) - 3, math.exp(-2) + 1)
    assert _exact(loss, (0.5 * math.exp(2) - 0.8 * math.exp(-2) + beta * (k3[0] + k3[1])) / 2)
    assert _exact(metrics["kl"], (k3[0] + k3[1]) / 2) and float(metrics["clip_ratio"]) == 0.0
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
