"""Fused LM-head log-probs (forward, entropy, backward) on every backend against the float64 reference."""

import pytest
import torch
from conftest import HAS_GPU, backends_for

import r1kernels
from r1kernels._ops import OPS
from r1kernels.grpo import lm_head_cpu, token_logprob_stats, token_logprobs
from r1kernels.grpo import lm_head_logprobs as tlp
from r1kernels.grpo import reference as ref
from r1kernels.grpo.kernels import logits_tile, logprob_fwd
from r1kernels.grpo.kernels.logits_tile import dot_precision

# fp32 inputs follow torch's fp32 matmul policy; its default ("highest") keeps the dots in full fp32.
FP32_GRAD_TOL = 2e-5 if HAS_GPU else 1e-5
# bf16: the backward stores d logits in bf16 before the two GEMMs (2^-9 relative per element).
BF16_GRAD_TOL = 1.5e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert not torch.isnan(a).any(), "NaN in output"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(N, H, V, dtype, device, bias=True, scale=1.0):
    hidden = (torch.randn(N, H) * scale).to(dtype).to(device)
    weight = (torch.randn(V, H) * H**-0.5 * 2).to(dtype).to(device)
    b = (torch.randn(V) * 0.5).to(dtype).to(device) if bias else None
    ids = torch.randint(0, V, (N,), device=device)
    return hidden, weight, b, ids


def _reference(hidden, weight, b, ids, temperature, grad_out):
    leaves = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    logp, entropy = ref.token_logprobs(leaves[0], leaves[1], ids.cpu(), leaves[2], temperature)
    grads = torch.autograd.grad((logp * grad_out.double().cpu()).sum(), [t for t in leaves if t is not None])
    return logp, entropy, grads


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,H,V", [(1, 16, 7), (37, 48, 300), (70, 64, 1000)], ids=str)
@pytest.mark.parametrize("bias,temperature", [(False, 1.0), (True, 0.7)])
def test_forward_backward_match_reference(backend, device, dtype, N, H, V, bias, temperature):
    hidden, weight, b, ids = _inputs(N, H, V, dtype, device, bias)
    grad_out = torch.randn(N, device=device)
    params = [t.requires_grad_() for t in (hidden, weight, b) if t is not None]
    with r1kernels.use_backend(backend):
        logp, lse, entropy = token_logprob_stats(
            hidden, weight, ids, bias=b, temperature=temperature, return_entropy=True
        )
        grads = torch.autograd.grad((logp * grad_out).sum(), params)
    r_logp, r_entropy, r_grads = _reference(hidden, weight, b, ids, temperature, grad_out)
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    assert torch.allclose(logp.double().cpu(), r_logp.detach(), atol=2e-5, rtol=0)
    assert torch.allclose(entropy.double().cpu(), r_entropy.detach(), atol=2e-5, rtol=0)
    assert torch.allclose((logp + lse).double().cpu(), logp.double().cpu() + lse.double().cpu())
    tol = FP32_GRAD_TOL if dtype == torch.float32 else BF16_GRAD_TOL  # fp16 (2^-12) is within the bf16 bound
    for name, g, r in zip(("d hidden", "d weight", "d bias"), grads, r_grads, strict=False):
        assert g.dtype == dtype
        assert _rel(g, r) < tol, f"{name}: rel. error {_rel(g, r):.2e}"


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("N,V", [(150, 500), (700, 300)], ids=["vocab-split", "token-split"])
def test_vocab_chunks_and_token_chunks(backend, device, monkeypatch, N, V):
    """Several vocab chunks in the forward (partials combined); in the backward several blocks that split the
    vocab (N < V: d hidden accumulates) or the tokens (N >= V: d weight accumulates)."""
    monkeypatch.setattr(logprob_fwd, "vocab_chunk", lambda *args: 192)  # the last chunk partial
    monkeypatch.setattr(tlp, "GPU_SCRATCH_BYTES", 64 * 128 * 4)  # one tile of the backward per block
    monkeypatch.setattr(tlp, "MIN_ACCUMULATE_K", 64)
    monkeypatch.setattr(lm_head_cpu, "VOCAB_TILE", 192)  # the CPU path's vocab tiles and token chunks
    monkeypatch.setattr(lm_head_cpu, "CPU_SCRATCH_BYTES", 16 * 192 * 4)
    hidden, weight, b, ids = _inputs(N, 32, V, torch.float32, device)
    grad_out = torch.randn(N, device=device)
    params = [t.requires_grad_() for t in (hidden, weight, b)]
    with r1kernels.use_backend(backend):
        logp, _, entropy = token_logprob_stats(hidden, weight, ids, bias=b, return_entropy=True)
        grads = torch.autograd.grad((logp * grad_out).sum(), params)
    r_logp, r_entropy, r_grads = _reference(hidden, weight, b, ids, 1.0, grad_out)
    rows, cols = tlp.grad_blocks(N, V, 4, 64, 64)  # the interpreter's fp32 tiles
    assert cols < V if N < V else rows < N  # the backward really runs several blocks
    assert _rel(logp, r_logp) < 1e-5 and _rel(entropy, r_entropy) < 1e-5
    for g, r in zip(grads, r_grads, strict=True):
        assert _rel(g, r) < FP32_GRAD_TOL


def _check_logp_entropy_and_grads(backend: str, dtype: torch.dtype, N: int, temperature: float) -> None:
    """Forward (log-probs, entropy) and both gradients of logp and entropy, with a bias, against float64."""
    hidden, weight, b, ids = _inputs(N, 48, 300, dtype, "cpu")
    grad_out, grad_ent = torch.randn(N), torch.randn(N)
    params = [t.requires_grad_() for t in (hidden, weight, b)]
    with r1kernels.use_backend(backend):
        logp, _, entropy = token_logprob_stats(hidden, weight, ids, bias=b, temperature=temperature,
                                               return_entropy=True)  # fmt: skip
        grads = torch.autograd.grad((logp * grad_out + entropy * grad_ent).sum(), params)
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, b)]
    r_logp, r_entropy = ref.token_logprobs(leaves[0], leaves[1], ids, leaves[2], temperature)
    r_grads = torch.autograd.grad((r_logp * grad_out.double() + r_entropy * grad_ent.double()).sum(), leaves)
    assert torch.allclose(logp.double(), r_logp.detach(), atol=2e-5, rtol=0)
    assert torch.allclose(entropy.double(), r_entropy.detach(), atol=2e-5, rtol=0)
    tol = FP32_GRAD_TOL if dtype == torch.float32 else BF16_GRAD_TOL
    for name, g, r in zip(("d hidden", "d weight", "d bias"), grads, r_grads, strict=True):
        assert _rel(g, r) < tol, f"{name}: rel. error {_rel(g, r):.2e}"


@pytest.mark.parametrize("tiny_macs,small_logits", [(0, 0), (0, 1 << 20), (1 << 30, 0)],
                         ids=["blocked", "one-shot", "tiny-c++"])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpu_tiny_one_shot_and_blocked_paths(monkeypatch, tiny_macs, small_logits, dtype):
    """The CPU path's three forms, each against the reference: one C++ call (decode-sized), one-shot PyTorch
    (logits fit 256 KiB), blocked (the rest)."""
    monkeypatch.setattr(lm_head_cpu, "TINY_MACS", tiny_macs)
    monkeypatch.setattr(lm_head_cpu, "SMALL_LOGITS", small_logits)
    _check_logp_entropy_and_grads("cpu", dtype, 37, 0.7)


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_logp", [True, False], ids=["logp+entropy", "entropy-only"])
def test_entropy_gradient(backend, device, dtype, with_logp):
    """An entropy bonus differentiates through the same fused backward: d(sum(a*logp + c*entropy))."""
    hidden, weight, b, ids = _inputs(45, 48, 300, dtype, device)
    ga, gc = torch.randn(45, device=device), torch.randn(45, device=device)
    params = [t.requires_grad_() for t in (hidden, weight, b)]
    with r1kernels.use_backend(backend):
        logp, _, entropy = token_logprob_stats(hidden, weight, ids, bias=b, temperature=0.8, return_entropy=True)
        objective = (gc * entropy).sum() + ((ga * logp).sum() if with_logp else 0.0)
        grads = torch.autograd.grad(objective, params)
    leaves = [t.detach().double().cpu().requires_grad_() for t in (hidden, weight, b)]
    r_logp, r_entropy = ref.token_logprobs(leaves[0], leaves[1], ids.cpu(), leaves[2], 0.8)
    r_objective = (gc.double().cpu() * r_entropy).sum()
    if with_logp:
        r_objective = r_objective + (ga.double().cpu() * r_logp).sum()
    r_grads = torch.autograd.grad(r_objective, leaves)
    tol = FP32_GRAD_TOL if dtype == torch.float32 else BF16_GRAD_TOL
    for name, g, r in zip(("d hidden", "d weight", "d bias"), grads, r_grads, strict=True):
        assert _rel(g, r) < tol, f"{name}: rel. error {_rel(g, r):.2e}"


def test_entropy_without_return_entropy_has_no_gradient():
    hidden, weight, _, ids = _inputs(4, 8, 20, torch.float32, "cpu", bias=False)
    _, _, entropy = token_logprob_stats(hidden.requires_grad_(), weight, ids)
    assert not entropy.requires_grad and torch.equal(entropy, torch.zeros(4))


@pytest.mark.parametrize("backend,device", backends_for())
def test_huge_logits_stay_finite(backend, device):
    hidden, weight, _, ids = _inputs(20, 32, 300, torch.float32, device, bias=False, scale=300.0)
    with r1kernels.use_backend(backend):
        logp, lse, entropy = token_logprob_stats(hidden, weight, ids, return_entropy=True)
    r_logp, r_entropy = ref.token_logprobs(hidden.cpu(), weight.cpu(), ids.cpu())
    assert torch.isfinite(lse).all() and torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert torch.allclose(logp.double().cpu(), r_logp, rtol=1e-5, atol=1e-3)
    assert torch.allclose(entropy.double().cpu(), r_entropy, rtol=1e-4, atol=1e-4)  # no cancellation at large z


@pytest.mark.parametrize("backend,device", backends_for())
def test_deterministic(backend, device):
    hidden, weight, _, ids = _inputs(70, 64, 400, torch.bfloat16, device, bias=False)
    ids = ids.int()  # int32 ids take the same kernels
    outs = []
    for _ in range(2):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with r1kernels.use_backend(backend):
            logp, _, _ = token_logprob_stats(h, w, ids)
            logp.sum().backward()
        outs.append((logp, h.grad, w.grad))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_one_word_vocab_and_empty_batch():
    hidden, weight, _, ids = _inputs(3, 16, 1, torch.float32, "cpu", bias=False)
    logp, lse, _ = token_logprob_stats(hidden, weight, ids)
    assert torch.equal(logp, torch.zeros(3))
    # one logit per row: lse is that logit (against float64: the fp32 dot's order is the kernel's own, and a logit
    # near 0 holds only its rounding, so the bar is absolute, at the scale of the 16 terms' rounding)
    torch.testing.assert_close(lse, (hidden.double() @ weight[0].double()).float(), rtol=1e-5, atol=2e-6)
    empty = token_logprob_stats(torch.randn(0, 16), weight, torch.zeros(0, dtype=torch.long))
    assert all(t.shape == (0,) for t in empty)


def test_token_logprobs_no_grad_shapes(kernel_device):
    hidden, weight, _, _ = _inputs(6, 16, 50, torch.float32, kernel_device, bias=False)
    hidden = hidden.view(2, 3, 16).requires_grad_()
    ids = torch.randint(0, 50, (2, 3), device=kernel_device)
    with r1kernels.use_backend("triton"):
        logp, entropy = token_logprobs(hidden, weight, ids, 1.0, return_entropy=True)
    r_logp, r_entropy = ref.token_logprobs(hidden.detach().cpu(), weight.cpu(), ids.cpu())
    assert logp.shape == (2, 3) and not logp.requires_grad
    assert torch.allclose(logp.double().cpu(), r_logp, atol=2e-5, rtol=0)
    assert torch.allclose(entropy.double().cpu(), r_entropy, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"hidden": torch.randn(4, 8).long()}, "hidden must have dtype"),
        ({"weight": torch.randn(10, 8).double()}, "weight must have dtype"),
        ({"weight": torch.randn(10, 9)}, "weight must be"),
        ({"token_ids": torch.zeros(5, dtype=torch.long)}, "one id per hidden row"),
        ({"token_ids": torch.tensor([0, 1, 2, 10])}, r"token_ids must lie in \[0, V\)"),
        ({"token_ids": torch.tensor([0, -1, 2, 3])}, r"token_ids must lie in \[0, V\)"),
        ({"token_ids": torch.zeros(4)}, "token_ids must have dtype"),
        ({"bias": torch.randn(11)}, "bias must have shape"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"temperature": float("nan")}, "temperature must be"),
        ({"hidden": torch.randn(8, 4).t()}, "unit stride"),
        ({"hidden": torch.randn(4, 0), "weight": torch.randn(10, 0)}, "V >= 1 and H >= 1"),
    ],
)
def test_bad_input(kwargs, match):
    args = {"hidden": torch.randn(4, 8), "weight": torch.randn(10, 8), "token_ids": torch.tensor([0, 1, 2, 3])}
    args.update(kwargs)
    with pytest.raises((TypeError, ValueError), match=match):
        token_logprob_stats(args.pop("hidden"), args.pop("weight"), args.pop("token_ids"), **args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"grad_logp": torch.randn(5)}, r"grad_logp must have shape \[N\] = \[4\]"),
        ({"grad_logp": torch.randn(4, 1)}, "grad_logp must have shape"),
        ({"grad_entropy": torch.randn(3)}, "grad_entropy must have shape"),
        ({"lse": torch.zeros(4, dtype=torch.long)}, "lse must be a floating-point tensor"),
        ({"entropy": [0.0] * 4}, "entropy must be a torch.Tensor"),
        ({"weight": torch.randn(10, 9)}, "weight must be"),
    ],
)
def test_bad_input_to_the_backward_op(kwargs, match):
    """The backward is a public op too (torch.ops.r1k.token_logprob_stats_backward): its per-token inputs are
    checked before the C++ kernel reads them through raw pointers. (Its ids are compared, never used as an
    index, so an id out of range cannot read out of bounds; the forward is where the range is checked.)"""
    args = {"grad_logp": torch.randn(4), "grad_entropy": None, "hidden": torch.randn(4, 8),
            "weight": torch.randn(10, 8), "bias": None, "token_ids": torch.tensor([0, 1, 2, 3]), "lse": torch.randn(4),
            "entropy": torch.rand(4), "temperature": 1.0}  # fmt: skip
    args.update(kwargs)
    with pytest.raises((TypeError, ValueError), match=match):
        OPS["token_logprob_stats_backward"](*args.values())


@pytest.mark.parametrize("backend,device", backends_for())
def test_nan_hidden_propagates_to_its_token_only(backend, device):
    hidden, weight, _, ids = _inputs(40, 32, 300, torch.float32, device, bias=False)
    hidden[7, 3] = float("nan")
    with r1kernels.use_backend(backend):
        logp, lse, entropy = token_logprob_stats(hidden, weight, ids, return_entropy=True)
    bad = torch.zeros(40, dtype=torch.bool)
    bad[7] = True
    for t in (logp, lse, entropy):
        assert torch.isnan(t.cpu()[bad]).all() and torch.isfinite(t.cpu()[~bad]).all()


@pytest.mark.parametrize("N,V", [(16384, 152064), (200_000, 152064), (131072, 152064)])
def test_backward_blocks_keep_the_fp32_update_compute_bound(N, V):
    rows, cols = tlp.grad_blocks(N, V, 2, 128, 128)
    k = cols if N < V else rows
    assert k >= tlp.MIN_ACCUMULATE_K and (rows == N or cols == V)
    assert rows * cols * 2 <= max(tlp.GPU_SCRATCH_BYTES, tlp.MIN_ACCUMULATE_K * max(N, V) * 2)


@pytest.mark.parametrize("N,V,expect_chunk", [(512, 151936, None), (16384, 151936, 8192), (70, 300, 384)])
def test_vocab_chunk_fills_the_gpu(N, V, expect_chunk):
    """Several waves of programs on 132 SMs at small N; the largest chunk at large N; one chunk at tiny V."""
    cfg = logprob_fwd.config(2, 90, "tf32")
    chunk = logprob_fwd.vocab_chunk(N, V, 132, cfg)
    programs = -(-N // cfg["BLOCK_N"]) * -(-V // chunk)
    assert (chunk % cfg["BLOCK_V"] == 0 and logprob_fwd.MIN_V_CHUNK <= chunk <= logprob_fwd.MAX_V_CHUNK) or V < 1024
    if expect_chunk is not None:
        assert chunk == expect_chunk
    else:
        assert programs >= logprob_fwd.WAVES * 132 > -(-N // cfg["BLOCK_N"]) * -(-V // logprob_fwd.MAX_V_CHUNK)


def test_fp32_dot_precision_follows_torch(monkeypatch):
    assert dot_precision(4, allow_tf32=False) == "ieee"
    assert dot_precision(4, allow_tf32=True) == "tf32"
    assert dot_precision(2, allow_tf32=False) == "tf32"  # 16-bit inputs: tensor cores regardless
    hidden = torch.randn(2, 8)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert tlp.precision_for(hidden) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert tlp.precision_for(hidden) == "ieee"
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.skipif(HAS_GPU, reason="forces the TMA path on CPU tensors; on a GPU the arch decides")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tma_operand_path_in_the_interpreter(monkeypatch, dtype):
    """The tensor-descriptor (TMA) loads of sm_90a, run by the interpreter: partial tiles at every edge (TMA
    zero-fills them), bias, temperature, entropy, both gradients."""
    monkeypatch.setattr(logits_tile, "use_tma", lambda arch, elt, *tensors: True)
    _check_logp_entropy_and_grads("triton", dtype, 70, 0.8)


def test_tma_is_chosen_only_where_the_hardware_takes_it():
    a = torch.empty(64, 128, dtype=torch.bfloat16)
    assert logits_tile.use_tma(90, 2, a, a)
    assert not logits_tile.use_tma(89, 2, a, a) and not logits_tile.use_tma(None, 2, a, a)  # sm_89, interpreter
    assert not logits_tile.use_tma(90, 4, a, a)  # fp32 keeps the pointer loads
    assert not logits_tile.use_tma(90, 2, a[:, 1:], a)  # base address not 16-byte aligned
    assert not logits_tile.use_tma(90, 2, torch.empty(64, 100, dtype=torch.bfloat16)[:, :96], a)  # 200-byte rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp+entropy"])
def test_cpu_backward_skips_rows_without_gradient(monkeypatch, dtype, with_entropy):
    """Masked tokens (incoming gradients exactly 0) are left out of the blocked CPU backward: d hidden 0 on
    their rows, everything else as the full computation gives, also with a NaN hidden state on a skipped row
    (0 x NaN would otherwise reach every d weight entry) and with every row skipped."""
    monkeypatch.setattr(lm_head_cpu, "TINY_MACS", 0)
    monkeypatch.setattr(lm_head_cpu, "SMALL_LOGITS", 0)
    N, H, V = 90, 24, 300
    hidden, weight, bias, ids = _inputs(N, H, V, dtype, "cpu", bias=True)
    _, lse, entropy = lm_head_cpu.forward(hidden, weight, bias, ids, 0.8, True)
    g, ge = torch.randn(N), torch.randn(N) if with_entropy else None
    g[50:] = 0.0
    if ge is not None:
        ge[50:] = 0.0
        ge[55] = 0.5  # an entropy gradient alone keeps a row
    monkeypatch.setattr(lm_head_cpu, "SKIP_ZERO_ROWS", 2.0)  # never skip: the full computation
    full = lm_head_cpu.backward(g, ge, hidden, weight, bias, ids, lse, entropy, 0.8)
    monkeypatch.setattr(lm_head_cpu, "SKIP_ZERO_ROWS", 1 / 16)
    monkeypatch.setattr(lm_head_cpu, "RUN_ROWS", 16)  # runs of 50 and 1 rows: 25.5 on average
    skip = lm_head_cpu._zero_gradient(g, ge)
    assert lm_head_cpu._row_chunks(skip, 20) == [(0, 20), (20, 40), (40, 50)] + [(55, 56)] * with_entropy
    poisoned = hidden.clone()
    poisoned[70, 3] = float("nan")  # a skipped row
    skipped = lm_head_cpu.backward(g, ge, poisoned, weight, bias, ids, lse, entropy, 0.8)
    kept = torch.zeros(N, dtype=torch.bool)
    kept[:50] = True
    kept[55] = with_entropy
    assert torch.equal(skipped[0][~kept], torch.zeros_like(skipped[0][~kept]))
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # the d weight sums run in other chunks: another order
    for a, b in zip(skipped, full, strict=True):
        assert torch.isfinite(a).all() and float((a.double() - b.double()).norm() / b.double().norm()) < tol
    nothing = lm_head_cpu.backward(torch.zeros(N), None, poisoned, weight, bias, ids, lse, entropy, 0.8)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in nothing)
