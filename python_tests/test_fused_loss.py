"""The single-pass training path of the GRPO loss (gradients computed in the forward): its written-out
per-token derivative against autograd, and the whole path against the float64 reference and the two-pass
path, over several token blocks, on the Triton kernels and the CPU path."""

import pytest
import torch

import r1kernels
from r1kernels.grpo import fused_loss, grpo_loss, lm_head_cpu
from r1kernels.grpo import lm_head_logprobs as lm
from r1kernels.grpo import reference as ref
from r1kernels.grpo.token_loss import TokenTerms, block_gradients, block_gradients_torch, token_log_ratio, token_loss

# block_gradients takes its C++ twin for CPU tensors; the torch form runs on GPUs
FORMS = [pytest.param(block_gradients, id="cpp"), pytest.param(block_gradients_torch, id="torch")]


def _terms(N, logp, old, delta, extras, unbiased_kl=False):
    shift = torch.randn(N) * 0.3
    shift[:40] = 0.0  # ratio exactly 1: a tie inside minimum()
    shift[40:60] = 30.0  # past the log-ratio clamp: no gradient through the ratio
    shift[60:80] = -30.0
    return TokenTerms(
        weight=torch.rand(N), adv=torch.randn(N), old=(logp - shift) if old else None,
        ref=(logp + torch.randn(N) * 0.5).index_fill(0, torch.arange(80, 90), 40.0) if extras else None,
        is_ratio=torch.rand(N) + 0.5 if extras else None, beta=0.05 if extras else 0.0, epsilon_low=0.2,
        epsilon_high=0.28, delta=delta, clamp=20.0, entropy_coef=0.01 if extras else 0.0, unbiased_kl=unbiased_kl,
    )  # fmt: skip


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("old", [True, False], ids=["old", "on-policy"])
@pytest.mark.parametrize("delta", [None, 1.3])
@pytest.mark.parametrize("extras", ["plain", "kl+is+entropy", "unbiased_kl"])
def test_written_out_derivative_matches_autograd(form, old, delta, extras):
    """Against autograd through ``token_loss`` in float64. fp32 autograd is not a fine enough judge: it forms
    d k3 / d logp as exp(d) - 1, which cancels for small d, and where the ratio sits at its clamp (exp(20))
    the unbiased KL's gradient multiplies that error by 5e8; it lands ~1e-4 off float64 there, the written-out
    form (expm1) ~4e-6 (worst of 200 seeds), hence rtol 1e-5."""
    N = 400
    logp = -torch.rand(N) * 5
    t = _terms(N, logp, old, delta, extras != "plain", unbiased_kl=extras == "unbiased_kl")
    entropy = torch.rand(N) * 3
    total, d_logp, d_entropy = form(logp, entropy, t)
    t64 = t._replace(**{k: v.double() for k, v in t._asdict().items() if isinstance(v, torch.Tensor)})
    lp, ent = logp.double().requires_grad_(), entropy.double().requires_grad_()
    per_token = t64.weight * token_loss(lp, ent, token_log_ratio(lp, t64.old, t.clamp), t64)
    want = per_token.sum()
    want_logp, want_ent = torch.autograd.grad(want, [lp, ent], allow_unused=True)
    assert abs(float(total) - want.item()) <= 1e-6 * per_token.detach().abs().sum().item()  # signs differ: no rtol
    assert torch.allclose(d_logp.double(), want_logp, rtol=1e-5, atol=1e-8)
    if extras != "plain":
        assert torch.allclose(d_entropy.double(), want_ent, rtol=1e-6)
    else:
        assert d_entropy is None and want_ent is None


@pytest.mark.parametrize("unbiased_kl", [False, True], ids=["k3", "unbiased"])
@pytest.mark.parametrize("delta", [None, 1.3])
def test_cpp_twin_matches_the_torch_form(unbiased_kl, delta):
    """The C++ loop against the torch ops it follows, every term on (unbiased KL included), non-contiguous
    per-token inputs, and NaN / Inf log-probs: NaN propagates the same way, nothing is silently zeroed, except
    on tokens of weight 0, which are not part of the loss: both forms leave them out (a NaN there too), give
    them no gradient and set their logp and entropy to 0 in place."""
    N = 300
    logp = -torch.rand(2 * N)[::2] * 5  # strided
    t = _terms(N, logp, True, delta, True, unbiased_kl)
    t.weight[[150, 151]] = 0.0
    logp = logp.clone()
    logp[100], logp[101], logp[102], logp[150] = float("nan"), float("-inf"), float("inf"), float("nan")
    entropy = torch.rand(N) * 3
    inputs = [(torch.empty(2 * N)[::2].copy_(logp), entropy.clone()) for _ in range(2)]  # strided: zeroed in place
    got, want = (form(*x, t) for form, x in zip((block_gradients, block_gradients_torch), inputs, strict=True))
    assert torch.isnan(got[0]) and torch.isnan(want[0])  # a NaN token loss reaches the sum
    for g, w in zip(got[1:], want[1:], strict=True):  # exp / expm1 differ by ulps between libm and torch: a
        # token whose gradient cancels to ~1e-4 of the largest one keeps that ulp error (5x margin over 1200 cases)
        scale = float(w[torch.isfinite(w)].abs().max())
        assert torch.allclose(g, w, rtol=1e-6, atol=1e-7 * scale, equal_nan=True)
    assert torch.equal(torch.isnan(got[1]), torch.isnan(want[1])) and torch.isnan(got[1][100])
    for lp, ent in inputs:  # the zero-weight tokens: reported as 0, no gradient; the others untouched
        assert lp[150:152].tolist() == [0.0, 0.0] and ent[150:152].tolist() == [0.0, 0.0]
        torch.testing.assert_close(lp[:150], logp[:150], rtol=0, atol=0, equal_nan=True)  # NaN at 100 stays
        assert torch.equal(ent[152:], entropy[152:])
    assert got[1][150:152].tolist() == [0.0, 0.0] and want[1][150:152].tolist() == [0.0, 0.0]
    keep = torch.ones(N, dtype=torch.bool)
    keep[100:103] = False  # the zero-weight NaN stays: it reaches nothing
    sub = t._replace(**{k: v[keep] for k, v in t._asdict().items() if isinstance(v, torch.Tensor)})
    total, total_torch = (form(logp[keep], entropy[keep], sub)[0] for form in (block_gradients, block_gradients_torch))
    assert torch.isfinite(total) and torch.allclose(total, total_torch, rtol=1e-6)


def _batch(B, T, H, V, dtype, device):
    hidden = torch.randn(B, T, H).to(dtype).to(device)
    weight = (torch.randn(V, H) * H**-0.5 * 2).to(dtype).to(device)
    bias = (torch.randn(V) * 0.3).to(dtype).to(device)
    ids = torch.randint(0, V, (B, T), device=device)
    mask = (torch.rand(B, T, device=device) > 0.2).float()
    logp, _ = ref.token_logprobs(hidden.cpu(), weight.cpu(), ids.cpu(), bias.cpu())
    old = (logp + 0.3 * torch.randn(B, T, dtype=torch.float64)).float().to(device)
    refp = (logp + 0.2 * torch.randn(B, T, dtype=torch.float64)).float().to(device)
    return hidden, weight, bias, ids, mask, torch.randn(B, device=device), old, refp


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("unbiased_kl", [False, True], ids=["k3", "unbiased-kl"])
def test_single_pass_matches_reference_and_two_pass(backend, dtype, unbiased_kl, monkeypatch, kernel_device):
    """Several token blocks (the scratch budget shrunk to one tile row) so the fp32 d-weight accumulates."""
    monkeypatch.setattr(lm, "MIN_ACCUMULATE_K", 1)
    monkeypatch.setattr(lm, "GPU_SCRATCH_BYTES", 1)
    device = kernel_device if backend == "triton" else "cpu"
    B, T, H, V = 3, 50, 32, 200
    # CPU: past the one-call C++ form, several vocab tiles and token chunks
    monkeypatch.setattr(lm_head_cpu, "TINY_MACS", 0)
    monkeypatch.setattr(lm_head_cpu, "SMALL_LOGITS", 0)
    monkeypatch.setattr(lm_head_cpu, "VOCAB_TILE", 64)
    monkeypatch.setattr(lm_head_cpu, "CPU_SCRATCH_BYTES", 4 * 64 * 16)
    hidden, weight, bias, ids, mask, adv, old, refp = _batch(B, T, H, V, dtype, device)
    kwargs = dict(bias=None, old_logps=old, ref_logps=refp, beta=0.04, epsilon_high=0.28, delta=1.5,
                  loss_type="dapo", return_entropy=True, entropy_coef=0.01, temperature=0.9,
                  unbiased_kl=unbiased_kl)  # fmt: skip
    results = []
    for single_pass in (True, False):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        with r1kernels.use_backend(backend):
            loss, metrics = grpo_loss(h, w, ids, mask, adv, **{**kwargs, "bias": b}, single_pass=single_pass)
            loss.backward()
        results.append((loss.detach(), metrics, h.grad, w.grad, b.grad))
    rh, rw, rb = (t.detach().double().cpu().requires_grad_() for t in (hidden, weight, bias))
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items() if k != "return_entropy"}
    r_loss, r_metrics = ref.grpo_loss(rh, rw, ids.cpu(), mask.cpu(), adv.cpu(), **{**cpu, "bias": rb})
    r_loss.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    (loss, metrics, dh, dw, db), (loss2, metrics2, dh2, dw2, db2) = results
    assert float(loss) == pytest.approx(float(r_loss), rel=tol, abs=1e-6)
    assert float(loss2) == pytest.approx(float(loss), rel=tol, abs=1e-6)
    for k in r_metrics:
        assert float(metrics[k]) == pytest.approx(float(r_metrics[k]), rel=tol, abs=1e-6), k
        assert float(metrics2[k]) == pytest.approx(float(metrics[k]), rel=tol, abs=1e-6), k
    for name, g, r, g2 in (
        ("d hidden", dh, rh.grad, dh2),
        ("d weight", dw, rw.grad, dw2),
        ("d bias", db, rb.grad, db2),
    ):
        err = float((g.double().cpu() - r).norm() / r.norm())
        assert err < tol * 10, f"{name}: {err:.2e}"
        assert float((g.double() - g2.double()).norm() / g2.double().norm()) < tol * 10, name
    rows = fused_loss.fused_rows(B * T, V, hidden.element_size(), 64 if dtype == torch.float32 else 128)
    assert backend == "cpu" or rows < B * T  # the Triton run really used several blocks


def test_second_backward_through_the_same_graph_fails_loudly():
    hidden, weight, _, ids, mask, adv, old, _ = _batch(2, 5, 16, 50, torch.float32, "cpu")
    w = weight.clone().requires_grad_()
    loss, _ = grpo_loss(hidden, w, ids, mask, adv, old_logps=old)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.02], ids=["no-entropy", "entropy"])
def test_cpu_fused_op_forms(with_bias, temperature, entropy_coef, monkeypatch):
    """The CPU fused op (fp32; loss and gradients in its forward) in each form (plain / addmm logits, with and
    without the entropy term) over several vocab tiles and token chunks, the last ones partial, against the
    float64 reference; its gradients and the differentiable op's (single_pass=False) agree to fp32 rounding."""
    monkeypatch.setattr(lm_head_cpu, "TINY_MACS", 0)
    monkeypatch.setattr(lm_head_cpu, "SMALL_LOGITS", 0)
    monkeypatch.setattr(lm_head_cpu, "VOCAB_TILE", 128)
    B, T, H, V = 2, 37, 24, 300
    monkeypatch.setattr(lm_head_cpu, "CPU_SCRATCH_BYTES", 16 * 128 * 4)
    hidden, weight, bias, ids, mask, adv, old, refp = _batch(B, T, H, V, torch.float32, "cpu")
    kwargs = dict(old_logps=old, ref_logps=refp, beta=0.04, epsilon_high=0.28, loss_type="bnpo",
                  return_entropy=entropy_coef > 0, entropy_coef=entropy_coef, temperature=temperature)  # fmt: skip
    results = []
    for single_pass in (True, False):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        with r1kernels.use_backend("cpu"):
            loss, metrics = grpo_loss(h, w, ids, mask, adv, bias=b if with_bias else None, single_pass=single_pass,
                                      **kwargs)  # fmt: skip
            loss.backward()
        results.append((loss.detach(), metrics, h.grad, w.grad, b.grad if with_bias else None))
    rh, rw, rb = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    r_kwargs = {k: v for k, v in kwargs.items() if k != "return_entropy"}
    r_loss, r_metrics = ref.grpo_loss(rh, rw, ids, mask, adv, bias=rb if with_bias else None, **r_kwargs)
    r_loss.backward()
    (loss, metrics, dh, dw, db), (loss2, _, dh2, dw2, db2) = results
    # the per-token losses are O(1) and cancel to 1e-4..1e-2: fp32 sums in any order carry ~1e-7 absolute
    assert float(loss) == pytest.approx(float(r_loss), rel=1e-5, abs=1e-6)
    assert float(loss2) == pytest.approx(float(loss), rel=1e-5, abs=1e-6)
    for k in metrics:
        assert float(metrics[k]) == pytest.approx(float(r_metrics[k]), rel=1e-5, abs=1e-6), k
    pairs = [("d hidden", dh, rh.grad, dh2), ("d weight", dw, rw.grad, dw2)]
    if with_bias:
        pairs.append(("d bias", db, rb.grad, db2))
    for name, g, r, g2 in pairs:
        assert float((g.double() - r).norm() / r.norm()) < 1e-5, name
        assert float((g - g2).norm() / g2.norm()) < 1e-5, name


@pytest.mark.parametrize("scattered_zero_gradients", [False, True], ids=["kl", "forced"])
def test_cpu_fused_loss_leaves_right_padding_out(scattered_zero_gradients, monkeypatch):
    """A right-padded batch on the CPU's blocked path: the padding tokens (weight 0) are left out of the forward
    and the backward, so a NaN hidden state there reaches nothing; loss, metrics and gradients match the float64
    reference on clean inputs, the padding rows' gradients are 0. "forced": per-token advantages of 0 scattered
    over the completions (no KL term) give the backward zero-gradient rows in runs too short to skip, and it
    must still leave out the rows the forward did not compute."""
    monkeypatch.setattr(lm_head_cpu, "TINY_MACS", 0)
    monkeypatch.setattr(lm_head_cpu, "SMALL_LOGITS", 0)
    monkeypatch.setattr(lm_head_cpu, "VOCAB_TILE", 128)
    monkeypatch.setattr(lm_head_cpu, "RUN_ROWS", 8)
    B, T, H, V = 4, 40, 24, 300
    hidden, weight, _, ids, _, _, old, refp = _batch(B, T, H, V, torch.float32, "cpu")
    mask = (torch.arange(T)[None] < torch.tensor([40, 25, 31, 12])[:, None]).float()
    adv = torch.randn(B, T)
    if scattered_zero_gradients:
        adv[:, ::3] = 0.0
    poisoned = hidden.clone()
    poisoned[3, 20, 5] = float("nan")  # a padding token
    kwargs = dict(old_logps=old, ref_logps=refp, beta=0.0 if scattered_zero_gradients else 0.04, loss_type="dapo")
    h, w = poisoned.clone().requires_grad_(), weight.clone().requires_grad_()
    with r1kernels.use_backend("cpu"):
        loss, metrics = grpo_loss(h, w, ids, mask, adv, **kwargs)
        loss.backward()
    rh, rw = (t.detach().double().requires_grad_() for t in (hidden, weight))
    r_loss, r_metrics = ref.grpo_loss(rh, rw, ids, mask, adv, **kwargs)
    r_loss.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert torch.equal(h.grad[mask == 0], torch.zeros_like(h.grad[mask == 0]))
    assert float(loss) == pytest.approx(float(r_loss), rel=1e-5, abs=1e-6)
    for k in metrics:
        assert float(metrics[k]) == pytest.approx(float(r_metrics[k]), rel=1e-5, abs=1e-6), k
    for got, want in ((h.grad, rh.grad), (w.grad, rw.grad)):
        assert float((got.double() - want).norm() / want.norm()) < 1e-5


def _three_kernel_composition(hidden, weight, bias, ids, t: TokenTerms, temperature, with_entropy):
    """The fused op's CPU path for tiny problems as the three one-call C++ kernels it joins, called one by one."""
    logp, lse, entropy = lm_head_cpu._forward_tiny(hidden, weight, bias, ids, 1.0 / temperature, with_entropy)
    total, g, ge = block_gradients(logp, entropy, t)
    d_hidden, d_weight, d_bias = lm_head_cpu._backward_tiny(g, ge, hidden, weight, bias, ids, lse, entropy,
                                                            1.0 / temperature)  # fmt: skip
    return total, logp, entropy, d_hidden, d_weight, d_bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("extras", ["plain", "kl+is+entropy", "unbiased_kl"])
def test_cpu_tiny_fused_op_is_its_three_kernels_in_one_call(dtype, with_bias, extras):
    """Decode-sized problems take one C++ call (csrc/grpo/fused_loss_small.cpp): the same bits as the three kernels
    called one by one (zero-weight tokens and ties at the clip bounds included), and within fp32 rounding of the
    blocked torch path."""
    N, H, V = 90, 20, 37  # N x V x H under TINY_MACS; padded rows, ties, clamps from _terms
    assert lm_head_cpu.tiny(N, V, H)
    hidden, weight, bias = torch.randn(N, H).to(dtype), (torch.randn(V, H) * 0.5).to(dtype), torch.randn(V).to(dtype)
    bias = bias if with_bias else None
    ids = torch.randint(0, V, (N,), dtype=torch.int32)
    logp0 = torch.log_softmax((hidden.float() @ weight.float().T) / 0.9, dim=-1).gather(1, ids.long()[:, None])[:, 0]
    t = _terms(N, logp0, old=True, delta=1.3, extras=extras != "plain", unbiased_kl=extras == "unbiased_kl")
    t = t._replace(weight=t.weight.index_fill(0, torch.tensor([3, 50, 89]), 0.0))  # padding tokens
    with_entropy = extras != "plain"
    args = (hidden, weight, bias, ids, t.weight, t.adv, t.old, t.ref, t.is_ratio, 0.9, t.beta, t.epsilon_low,
            t.epsilon_high, t.delta, t.clamp, t.entropy_coef, t.unbiased_kl, with_entropy)  # fmt: skip
    got = fused_loss._fused_op(*args)
    want = _three_kernel_composition(hidden, weight, bias, ids.long(), t, 0.9, with_entropy)
    names = ("loss", "logp", "entropy", "d hidden", "d weight", "d bias")
    for name, g, w in zip(names, got, want, strict=True):
        if name == "d bias" and bias is None:
            assert g.shape == (0,) and g.dtype == dtype
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), name
    assert torch.equal(got[1][[3, 50, 89]], torch.zeros(3))  # reported as 0, as the blocked path does
    with pytest.MonkeyPatch.context() as mp:  # the blocked torch path on the same inputs
        mp.setattr(lm_head_cpu, "TINY_MACS", 0)
        mp.setattr(lm_head_cpu, "SMALL_LOGITS", 0)
        blocked = fused_loss._fused_op(*args)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, g, b in zip(names, got, blocked, strict=True):
        if g.numel():
            err = float((g.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))
            # the loss sums O(1) per-token terms that cancel, in another order on each path: up to ~2e-5 of it
            # over 450 random draws (the other outputs stayed 5x inside their bars in fp32, 2x in bf16)
            assert err < (1e-4 if name == "loss" else tol), f"{name}: {err:.2e}"


def test_cpu_tiny_fused_op_takes_strided_terms():
    """Per-token terms that are views with a stride (valid input) go the general way (the three kernels one by
    one), the contiguous ones the one-call path: the same bits."""
    N, H, V = 90, 16, 24  # _terms wants 90 tokens; N x V x H under TINY_MACS
    hidden, weight, ids = torch.randn(N, H), torch.randn(V, H) * 0.5, torch.randint(0, V, (N,))
    logp0 = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, ids[:, None])[:, 0]
    t = _terms(N, logp0, old=True, delta=1.3, extras=True, unbiased_kl=False)
    assert lm_head_cpu.tiny(N, V, H)

    def strided(x):
        return None if x is None else torch.stack([x, torch.full_like(x, float("nan"))], 1)[:, 0]

    rest = (1.0, t.beta, t.epsilon_low, t.epsilon_high, t.delta, t.clamp, t.entropy_coef, t.unbiased_kl, True)
    want = fused_loss._fused_op(hidden, weight, None, ids, *t[:5], *rest)
    got = fused_loss._fused_op(hidden, weight, None, ids, *map(strided, t[:5]), *rest)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01], ids=["no-entropy", "entropy"])
def test_cpu_tiny_fused_op_leaves_padding_out(entropy_coef):
    """Decode-sized problems (one C++ call) leave every zero-weight token out of the backward too, not only runs of
    them: a NaN hidden state there reaches no gradient; the rest matches the float64 reference on clean inputs."""
    B, T, H, V = 2, 9, 16, 40
    hidden, weight, _, ids, _, _, old, refp = _batch(B, T, H, V, torch.float32, "cpu")
    mask = (torch.arange(T)[None] < torch.tensor([9, 4])[:, None]).float()
    mask[0, 3] = 0.0  # a masked token between real ones: not a run
    adv = torch.randn(B)
    poisoned = hidden.clone()
    poisoned[1, 6, 2], poisoned[0, 3, 5] = float("nan"), float("inf")
    kwargs = dict(old_logps=old, ref_logps=refp, beta=0.04, loss_type="dapo", entropy_coef=entropy_coef)
    assert lm_head_cpu.tiny(B * T, V, H)
    h, w = poisoned.clone().requires_grad_(), weight.clone().requires_grad_()
    with r1kernels.use_backend("cpu"):
        loss, _ = grpo_loss(h, w, ids, mask, adv, return_entropy=entropy_coef > 0, **kwargs)
        loss.backward()
    rh, rw = (t.detach().double().requires_grad_() for t in (hidden, weight))
    r_loss, _ = ref.grpo_loss(rh, rw, ids, mask, adv, **kwargs)
    r_loss.backward()
    assert torch.isfinite(w.grad).all() and torch.equal(h.grad[mask == 0], torch.zeros_like(h.grad[mask == 0]))
    assert float(loss.detach()) == pytest.approx(float(r_loss.detach()), rel=1e-5, abs=1e-6)
    for got, want in ((h.grad, rh.grad), (w.grad, rw.grad)):
        assert float((got.double() - want).norm() / want.norm()) < 1e-5


def test_cpu_tiny_fused_op_rejects_out_of_range_ids():
    hidden, weight = torch.randn(3, 8), torch.randn(5, 8)
    ids, w, adv = torch.tensor([0, 5, 1]), torch.ones(3), torch.randn(3)
    with pytest.raises(ValueError, match="token_ids"):
        fused_loss._fused_op(hidden, weight, None, ids, w, adv, None, None, None, 1.0, 0.0, 0.2, 0.2, None, 20.0,
                             0.0, False, False)  # fmt: skip


def test_fused_op_rejects_per_token_terms_on_another_device():
    hidden, weight, ids = torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 4, 1])
    adv = torch.randn(3, device="meta")
    with pytest.raises(ValueError, match="adv must be on hidden's device"):
        fused_loss._fused_op(hidden, weight, None, ids, torch.ones(3), adv, None, None, None, 1.0, 0.0, 0.2, 0.2,
                             None, 20.0, 0.0, False, False)  # fmt: skip
