"""The token-level GRPO loss and its gradients in one pass over the LM head, for training.

``grpo_loss`` (token-level importance sampling, gradients wanted) calls ``fused_token_loss`` instead of the
differentiable log-prob op: the op ``grpo_token_loss_fused`` computes the loss AND its gradients w.r.t.
hidden, weight and bias in one call (as Liger-Kernel's fused losses do; the op itself is not differentiable:
its outputs include the gradients), and the autograd wrapper's backward only scales them. Each token's
loss depends on nothing but its own log-prob, entropy and per-token terms (``token_loss``), so a block of
tokens can be finished once its log-sum-exp over the whole vocabulary is known.

- GPU (Triton), 6NHV FLOPs instead of 8NHV: per block of ``rows`` tokens the forward kernel writes the fp32
  logits to a ``[rows, V]`` scratch beside its statistics; ``d loss / d logp`` of the block comes from the
  written-out derivative of ``token_loss`` (``block_gradients``); the d-logits kernel reads the kept logits
  (no recompute) and the two matmuls give the block's d hidden (complete: the block spans the vocabulary)
  and add its share of d weight (fp32).
  ``rows`` is at least MIN_ACCUMULATE_K so that the fp32 d-weight update stays compute-bound, which puts the
  scratch at ``rows * V * (4 + itemsize)`` bytes (1.9 GB at V = 152064 in bf16): the price of the saved
  recompute. GSPO's sequence-level ratio couples a sequence's tokens, so it keeps the two-pass path.
- CPU: the forward statistics, the loss gradient, then the blocked CPU backward, 8NHV. A single pass on a
  CPU needs the fp32 logits of a token block over the whole vocabulary, and blocks small enough for the
  memory budget (64 rows at V = 32000) stream the weight and the fp32 d weight through memory once per
  block: a 6NHV single pass built that way was measured slower than these 8NHV (4.19 vs 3.65 s at N 4096,
  H 1024, V 32000 fp32 on 2 cores; 6.70 vs 6.30 s on another machine), whose vocab tiles stay in cache
  (benchmarks/NOTES.md).
"""

from __future__ import annotations

import torch

from r1kernels import _alloc, _ops, backend
from r1kernels._checks import cdiv, check_index_range, check_tensor, same_device
from r1kernels._ext import ext
from r1kernels._ops import Sample, define_op
from r1kernels.grpo import lm_head_cpu
from r1kernels.grpo import lm_head_logprobs as lm
from r1kernels.grpo.kernels import logprob_grad_logits, matmul
from r1kernels.grpo.token_loss import TokenTerms, block_gradients

_OP = "grpo_token_loss_fused"


def fused_rows(N: int, V: int, elt: int, block_n: int) -> int:
    """Token rows per block: what fits lm.GPU_SCRATCH_BYTES of fp32 logits + d logits, but at least
    lm.MIN_ACCUMULATE_K (the fp32 d-weight update per block stays compute-bound), never more than N."""
    budget = lm.GPU_SCRATCH_BYTES // (V * (4 + elt))
    rows = cdiv(max(block_n, lm.MIN_ACCUMULATE_K, budget), block_n) * block_n
    return min(rows, cdiv(N, block_n) * block_n)


def _single_pass_triton(hidden, weight, bias, ids, t: TokenTerms, temperature: float, with_entropy: bool):
    N, H = hidden.shape
    V, dev, elt = weight.shape[0], hidden.device, hidden.element_size()
    arch, precision = backend.device_arch(dev), lm.precision_for(hidden)
    cfg = logprob_grad_logits.config(elt, arch, precision)
    mm = matmul.config(elt, arch, precision)
    rows = fused_rows(N, V, elt, cfg["BLOCK_N"])
    logits = _alloc.empty((rows, V), torch.float32, dev)
    gz = _alloc.empty((rows, V), hidden.dtype, dev)
    d_hidden = _alloc.empty((N, H), hidden.dtype, dev)  # each block's rows are complete: written once
    d_weight = torch.zeros((V, H), dtype=torch.float32, device=dev) if rows < N else _alloc.empty(
        (V, H), weight.dtype, dev)  # fmt: skip
    d_bias32 = torch.zeros((V,), dtype=torch.float32, device=dev) if bias is not None else None
    logp, entropy = _alloc.empty((N,), torch.float32, dev), _alloc.empty((N,), torch.float32, dev)
    total = torch.zeros((), dtype=torch.float32, device=dev)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        h, z, g_z = hidden[r0:r1], logits[: r1 - r0], gz[: r1 - r0]
        lp, lse, ent = lm.forward_triton(h, weight, bias, ids[r0:r1], temperature, with_entropy, logits=z)
        part, g, ge = block_gradients(lp, ent, t.rows(r0, r1))
        lm.grad_logits(h, weight, bias, ids[r0:r1], lse, g, ge, ent, g_z, 0, temperature, cfg, precision, z)
        lm.launch_matmul(g_z, weight, d_hidden[r0:r1], False, mm, precision)  # d hidden = G @ W
        lm.launch_matmul(g_z.T, h, d_weight, rows < N, mm, precision)  # d weight (+)= G^T @ H
        if d_bias32 is not None:
            d_bias32 += torch.sum(g_z, dim=0, dtype=torch.float32)
        logp[r0:r1], entropy[r0:r1] = lp, ent
        total += part
    d_bias = hidden.new_empty((0,)) if d_bias32 is None else d_bias32.to(bias.dtype)
    return total, logp, entropy, d_hidden, d_weight.to(weight.dtype), d_bias


def _two_pass(hidden, weight, bias, ids, t: TokenTerms, temperature: float, with_entropy: bool):
    # zero-weight tokens are not part of the loss: the CPU's blocked loops leave their runs out, and
    # block_gradients reports them as 0 (a mask is worth its ops only where rows can be left out)
    (N, H), V = hidden.shape, weight.shape[0]
    skip = t.weight == 0 if lm_head_cpu.blocked(N, V, H) else None
    logp, lse, entropy = lm.logprob_stats(hidden, weight, bias, ids, temperature, with_entropy, op=_OP, skip=skip)
    total, g, ge = block_gradients(logp, entropy, t)
    d_hidden, d_weight, d_bias = lm.logprob_stats_backward(g, ge, hidden, weight, bias, ids, lse, entropy,
                                                           temperature)  # fmt: skip
    return total, logp, entropy, d_hidden, d_weight, hidden.new_empty((0,)) if d_bias is None else d_bias


def _tiny_cpu(hidden, weight, bias, token_ids, N, H, V, term_pointers, temperature, beta, epsilon_low, epsilon_high,
              delta, clamp, entropy_coef, unbiased_kl, with_entropy):  # fmt: skip
    """The three CPU kernels of ``_two_pass`` in one C++ call (csrc/grpo/fused_loss_small.cpp), for decode sizes,
    where each call from Python, with its outputs and intermediates, cost more than its math; hidden [N, H],
    weight [V, H], the per-token terms as ``_term_pointers`` gives them. Arguments positional: this glue was most
    of the op."""
    ids = lm_head_cpu.ids_int64(token_ids)
    # the 0-d size as a keyword: () positionally costs torch's argument parser ~0.2 us more
    total, logp, entropy = torch.empty(size=()), torch.empty(N), torch.empty(N)
    d_hidden, d_weight = torch.empty(N, H), torch.empty(V, H)
    d_bias = torch.empty(0, dtype=hidden.dtype) if bias is None else torch.empty(V)
    _alloc.poison(total, logp, entropy, d_hidden, d_weight, d_bias)
    ok = ext().grpo_token_loss_fused_small_cpu(
        *lm_head_cpu.problem_fields(hidden, weight, bias, ids, 1.0 / temperature, N, H, V), *term_pointers, beta,
        epsilon_low, epsilon_high, 0.0 if delta is None else delta, delta is not None, clamp, entropy_coef,
        unbiased_kl, with_entropy, total.data_ptr(), logp.data_ptr(), entropy.data_ptr(), d_hidden.data_ptr(),
        d_weight.data_ptr(), 0 if bias is None else d_bias.data_ptr(),
    )  # fmt: skip
    if not ok:
        check_index_range("token_ids", ids, V, "V")  # raises, naming the values
    if hidden.dtype is not _FP32:  # the kernel's gradients are fp32
        d_hidden, d_weight = d_hidden.to(hidden.dtype), d_weight.to(hidden.dtype)
        d_bias = d_bias if bias is None else d_bias.to(hidden.dtype)
    return total, logp, entropy, d_hidden, d_weight, d_bias


_TERM_NAMES = ("weights", "adv", "old", "ref", "is_ratio")
_TENSOR, _FP32 = torch.Tensor, torch.float32


def _term_pointers(hidden: torch.Tensor, N: int, terms: tuple) -> list[int] | None:
    """The per-token terms' addresses (0 for None) when each is None or a contiguous [N] fp32 tensor on hidden's
    device, read in one pass (the usual case); else None, and ``_validate_terms`` names what is wrong, if anything
    is (a strided term is valid: it goes the general way)."""
    cpu, shape = hidden.is_cpu, (N,)
    pointers = []
    for v in terms:
        if v is None:
            pointers.append(0)
        elif (isinstance(v, _TENSOR) and v.dtype is _FP32 and v.shape == shape and v.is_contiguous()
              and (v.is_cpu if cpu else same_device(hidden, v))):  # fmt: skip
            pointers.append(v.data_ptr())
        else:
            return None
    return pointers


def _validate_terms(hidden: torch.Tensor, terms: tuple) -> None:
    """Raises, naming the term, unless each is None or [N] fp32 on hidden's device (after ``_term_pointers``
    said no: the usual case never comes here)."""
    N = hidden.shape[0]
    for name, v in zip(_TERM_NAMES, terms, strict=True):
        if v is None:
            continue
        check_tensor(name, v, dtypes=(torch.float32,), ndim=1)
        if v.shape[0] != N:
            raise ValueError(f"{name} must have one value per token ({N}), got shape {tuple(v.shape)}")
        if not same_device(hidden, v):
            raise ValueError(f"{name} must be on hidden's device {hidden.device}, got {v.device}")


def _fake(hidden, weight, bias, token_ids, weights, adv, old, ref, is_ratio, temperature, beta, epsilon_low,
          epsilon_high, delta, clamp, entropy_coef, unbiased_kl, with_entropy):  # fmt: skip
    lm.validate(hidden, weight, bias, token_ids, temperature)
    n = hidden.shape[0]
    d_bias = torch.empty_like(bias) if bias is not None else hidden.new_empty((0,))
    per_token = [hidden.new_empty((n,), dtype=torch.float32) for _ in range(2)]
    loss = hidden.new_empty((), dtype=torch.float32)
    return loss, *per_token, torch.empty_like(hidden), torch.empty_like(weight), d_bias


class _FusedLoss(torch.autograd.Function):
    """The loss differentiable w.r.t. hidden, weight and bias, its gradients already computed by the op."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, *rest):
        loss, logp, entropy, d_hidden, d_weight, d_bias = _fused_op(hidden, weight, bias, *rest)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(logp, entropy)
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        grads = ctx.saved_tensors
        if _ops.plain_eager((grad_loss, *grads)):
            # in place: the gradients are private to this graph, and a second [V, H] buffer is not needed (a
            # second backward through the same graph fails autograd's version check instead of scaling twice)
            grads = [t.mul_(grad_loss.to(t.dtype)) for t in grads]
        else:
            grads = [t * grad_loss.to(t.dtype) for t in grads]
        return grads[0], grads[1], grads[2] if ctx.has_bias else None, *([None] * 15)


def _samples(device: str):
    N, H, V = 9, 16, 40
    hidden, weight = torch.randn(N, H, device=device), torch.randn(V, H, device=device) * 0.5
    ids = torch.randint(0, V, (N,), device=device)
    w, adv = torch.rand(N, device=device) / N, torch.randn(N, device=device)
    old, ref = -torch.rand(N, device=device) * 4, -torch.rand(N, device=device) * 4
    yield Sample((hidden, weight, torch.randn(V, device=device), ids, w, adv, old, ref, None, 0.9, 0.04, 0.2, 0.28,
                  1.5, 20.0, 0.01, True, True))  # fmt: skip
    yield Sample((hidden, weight, None, ids.int(), w, adv, None, None, torch.rand(N, device=device), 1.0, 0.0, 0.2,
                  0.2, None, 20.0, 0.0, False, False))  # fmt: skip


@define_op(_OP, fake=_fake, samples=_samples)
def _fused_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    token_ids: torch.Tensor,
    weights: torch.Tensor,
    adv: torch.Tensor,
    old: torch.Tensor | None,
    ref: torch.Tensor | None,
    is_ratio: torch.Tensor | None,
    temperature: float,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None,
    clamp: float,
    entropy_coef: float,
    unbiased_kl: bool,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    sizes = lm.valid_sizes(hidden, weight, bias, token_ids, temperature)
    if sizes is None:
        lm.validate(hidden, weight, bias, token_ids, temperature)  # names what is wrong, if anything is
        sizes = hidden.shape[0], hidden.shape[1], weight.shape[0]
    N, H, V = sizes
    terms = (weights, adv, old, ref, is_ratio)
    pointers = _term_pointers(hidden, N, terms)
    if pointers is None:
        _validate_terms(hidden, terms)
    elif N and lm_head_cpu.tiny(N, V, H) and backend.on_cpu(hidden, _OP):
        return _tiny_cpu(hidden, weight, bias, token_ids, N, H, V, pointers, temperature, beta, epsilon_low,
                         epsilon_high, delta, clamp, entropy_coef, unbiased_kl, with_entropy)  # fmt: skip
    t = TokenTerms(weights, adv, old, ref, is_ratio, beta, epsilon_low, epsilon_high, delta, clamp, entropy_coef,
                   unbiased_kl)  # fmt: skip
    if N == 0:
        empty = hidden.new_zeros((0,), dtype=torch.float32)
        d_bias = hidden.new_empty((0,)) if bias is None else torch.zeros_like(bias)
        return empty.sum(), empty, empty.clone(), torch.zeros_like(hidden), torch.zeros_like(weight), d_bias
    if backend.on_cpu(hidden, _OP):
        return _two_pass(hidden, weight, bias, token_ids, t, temperature, with_entropy)  # checks the ids
    check_index_range("token_ids", token_ids, weight.shape[0], "V")
    return _single_pass_triton(hidden, weight, bias, token_ids.long(), t, temperature, with_entropy)


def fused_token_loss(hidden, weight, bias, token_ids, t: TokenTerms, temperature: float, with_entropy: bool):
    """``(loss, logp, entropy)``: loss = sum(t.weight * token_loss) of the rows ``hidden [N, H]`` under
    ``weight [V, H]`` (+ ``bias``), differentiable w.r.t. hidden, weight and bias through gradients computed
    in this forward; logp and entropy ``[N]`` fp32 (no gradient; entropy zeros unless ``with_entropy``).
    Tokens whose weight is 0 (masked, padding) are not part of the loss: their logp and entropy are 0, their
    gradients 0, and the CPU path does not compute them (runs of them; all of them in decode-sized problems), so a
    NaN there reaches nothing."""
    terms = (t.weight, t.adv, t.old, t.ref, t.is_ratio, temperature, t.beta, t.epsilon_low, t.epsilon_high, t.delta,
             t.clamp, t.entropy_coef, t.unbiased_kl, with_entropy)  # fmt: skip
    return _FusedLoss.apply(hidden, weight, bias, token_ids, *terms)
