"""Token log-probs through the LM head without materialising the ``[tokens, vocab]`` logits.

``logp[n] = log softmax((hidden[n] @ weight.T + bias) / T)[token_ids[n]]``, its log-sum-exp and
(optionally) the entropy of the same distribution, with a backward that recomputes logits tile by tile.
GPU memory beyond inputs and outputs: O(tokens x vocab-chunks) partials in the forward; in the backward
one bounded d-logits scratch (GPU_SCRATCH_BYTES) plus an fp32 accumulator for the smaller of d hidden
``[N, H]`` and d weight ``[V, H]``.
The CPU path is ``lm_head_cpu``.
"""

from __future__ import annotations

import math

import torch

from r1kernels import _alloc, backend
from r1kernels._checks import cdiv, check_index_range, check_same_device, check_tensor, same_device
from r1kernels._launch import launch
from r1kernels._ops import Sample, define_op
from r1kernels.grpo import lm_head_cpu
from r1kernels.grpo.kernels import logits_tile, logprob_fwd, logprob_grad_logits, matmul
from r1kernels.grpo.kernels.logits_tile import dot_precision

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Bytes of the backward's [rows, V] gradient scratch on the GPU (the CPU path bounds its own blocks).
GPU_SCRATCH_BYTES = 256 * 2**20
# Smallest vocab slice / token slice of a backward block (see grad_blocks).
MIN_ACCUMULATE_K = 2048


# ---- validation -------------------------------------------------------------------------------------


def validate(hidden, weight, bias, token_ids, temperature) -> None:
    """Raises, naming the argument, unless hidden [N, H], weight [V, H] (+ bias [V]) of one float dtype with unit
    stride in the last dim, token_ids [N] int64 / int32, all on one device, and a finite temperature > 0."""
    if valid_sizes(hidden, weight, bias, token_ids, temperature) is None:
        _explain(hidden, weight, bias, token_ids, temperature)


_TENSOR = torch.Tensor
ID_DTYPES = (torch.int64, torch.int32)
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # the fast check's; others are checked


def valid_sizes(hidden, weight, bias, token_ids, temperature) -> tuple[int, int, int] | None:
    """``(N, H, V)`` of valid inputs, recognised by plain attribute reads (~1 us: a decode-sized call's budget is
    ~15 us), else None; it accepts nothing that ``_explain`` rejects, which runs whenever this says no and names
    what is wrong. The sizes spare a decode-sized caller reading the shapes again."""
    if not (isinstance(hidden, _TENSOR) and isinstance(weight, _TENSOR) and isinstance(token_ids, _TENSOR)):
        return None
    dtype = hidden.dtype
    if not (dtype in FLOAT_DTYPES and weight.dtype is dtype and token_ids.dtype in ID_DTYPES):
        return None
    try:  # unpacking checks the ranks too
        (N, H), (V, Hw), (Ni,) = hidden.shape, weight.shape, token_ids.shape
    except ValueError:
        return None
    if Hw != H or Ni != N or V == 0 or H == 0:
        return None
    if H > 1 and (hidden.stride()[1] != 1 or weight.stride()[1] != 1):  # the tuple: stride(1) costs twice
        return None
    if not ((hidden.is_cpu and weight.is_cpu and token_ids.is_cpu) or same_device(hidden, weight, token_ids)):
        return None
    if bias is not None and not (isinstance(bias, _TENSOR) and bias.dtype is dtype and bias.dim() == 1
                                 and bias.shape[0] == V and same_device(hidden, bias)):  # fmt: skip
        return None
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        return None
    return N, H, V


def _explain(hidden, weight, bias, token_ids, temperature) -> None:
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("weight", weight, dtypes=(hidden.dtype,), ndim=2)
    check_tensor("token_ids", token_ids, dtypes=(torch.int64, torch.int32), ndim=1)
    if bias is not None:
        check_tensor("bias", bias, dtypes=(hidden.dtype,), ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        check_same_device(hidden=hidden, weight=weight, token_ids=token_ids, bias=bias)
    else:
        check_same_device(hidden=hidden, weight=weight, token_ids=token_ids)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[1]}, "
                         f"got {tuple(weight.shape)}")  # fmt: skip
    if token_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"token_ids must have one id per hidden row ({hidden.shape[0]}), got {token_ids.shape[0]}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension; call .contiguous() first")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must be [V, H] with V >= 1 and H >= 1, got {tuple(weight.shape)}")


# ---- forward ----------------------------------------------------------------------------------------


def precision_for(t: torch.Tensor) -> str:
    return dot_precision(t.element_size(), torch.get_float32_matmul_precision() != "highest")


def forward_triton(hidden, weight, bias, token_ids, temperature, return_entropy, logits=None):
    """(logp, lse, entropy) of every row; with ``logits`` (an fp32 [N, V] buffer, unit column stride) the
    kernel also writes the logits there, for the single-pass training path."""
    N, H = hidden.shape
    V = weight.shape[0]
    arch, precision = backend.device_arch(hidden.device), precision_for(hidden)
    cfg = logprob_fwd.config(hidden.element_size(), arch, precision, store=logits is not None)
    v_chunk = logprob_fwd.vocab_chunk(N, V, backend.sm_count(hidden.device), cfg)
    n_chunks = cdiv(V, v_chunk)
    part = _alloc.empty((4, n_chunks, N), torch.float32, hidden.device)
    grid = (cdiv(N, cfg["BLOCK_N"]) * n_chunks,)
    z = part if logits is None else logits
    args = (hidden, weight, bias if bias is not None else weight, token_ids, part, z,
            N, V, H, hidden.stride(0), weight.stride(0), 1.0 / temperature, v_chunk, z.stride(0))  # fmt: skip
    tma = logits_tile.use_tma(arch, hidden.element_size(), hidden, weight)
    launch(logprob_fwd.logprob_fwd_kernel, grid, args, cfg, hidden.device, HAS_BIAS=bias is not None,
           WITH_ENTROPY=return_entropy, STORE_LOGITS=logits is not None, PRECISION=precision, USE_TMA=tma)  # fmt: skip
    m, s, zy, t = part.unbind(0)
    m_all = m.amax(dim=0)
    scale = torch.exp(m - m_all)
    s_all = (s * scale).sum(dim=0)
    lse = m_all + torch.log(s_all)
    logp = zy.sum(dim=0) - lse
    if return_entropy:  # each chunk's t is relative to its own max: move it to the global max first
        entropy = torch.log(s_all) - ((t + (m - m_all) * s) * scale).sum(dim=0) / s_all
    else:
        entropy = torch.zeros_like(lse)
    return logp, lse, entropy


def logprob_stats(hidden, weight, bias, token_ids, temperature, return_entropy, op="token_logprob_stats", skip=None):
    """(logp, lse, entropy) [N] fp32. ``skip``: optional [N] bool of rows whose results are not wanted: the
    CPU's blocked path leaves them out (their results are then not values); elsewhere they are computed."""
    N = hidden.shape[0]
    if N == 0:
        empty = hidden.new_zeros((0,), dtype=torch.float32)
        return empty, empty.clone(), empty.clone()
    if backend.on_cpu(hidden, op):
        return lm_head_cpu.forward(hidden, weight, bias, token_ids, temperature, return_entropy, skip)  # checks ids
    check_index_range("token_ids", token_ids, weight.shape[0], "V")
    return forward_triton(hidden, weight, bias, token_ids.long(), temperature, return_entropy)


# ---- backward ---------------------------------------------------------------------------------------


def grad_blocks(N: int, V: int, elt: int, block_n: int, block_v: int) -> tuple[int, int]:
    """(token rows, vocab columns) of one backward block, whose d-logits scratch fits GPU_SCRATCH_BYTES.

    The smaller of d hidden [N, H] and d weight [V, H] is the one accumulated in fp32 across blocks, so the
    block spans the whole of the other dimension: all tokens x a vocab slice when N < V, else a token slice
    x the whole vocab. The slice is at least MIN_ACCUMULATE_K wide even past the scratch budget: each block
    reads and writes the fp32 accumulator once (8 bytes per element) for 2 x slice FLOPs per element, so a
    narrower slice makes the update memory-bound (H100: 989 TFLOP/s / 3.35 TB/s ~ 295 FLOP/byte, i.e. a
    slice of ~1200; 768 tokens at V = 152064 under the old budget-only rule ran at ~60% of the GEMM rate)."""
    if N < V:
        cols = max(block_v, MIN_ACCUMULATE_K, (GPU_SCRATCH_BYTES // (N * elt)) // block_v * block_v)
        return N, min(cdiv(cols, block_v) * block_v, cdiv(V, block_v) * block_v)
    rows = max(block_n, MIN_ACCUMULATE_K, (GPU_SCRATCH_BYTES // (V * elt)) // block_n * block_n)
    return min(cdiv(rows, block_n) * block_n, cdiv(N, block_n) * block_n), V


def launch_matmul(a, b, c, accumulate: bool, cfg, precision: str) -> None:
    M, K = a.shape
    Nc = b.shape[1]
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(Nc, cfg["BLOCK_N"]),)
    args = (a, b, c, M, Nc, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0))
    launch(matmul.matmul_kernel, grid, args, cfg, a.device, ACCUMULATE=accumulate, PRECISION=precision)


def grad_logits(h, w, bias, ids, lse, g, ge, ent, out, col0, temperature, cfg, precision, logits=None) -> None:
    """out [rows, cols] = d loss / d logits of rows ``h`` over vocab ids col0 + [0, cols) (weight rows ``w``),
    from d loss / d logp ``g`` (and d / d entropy ``ge``); reads ``logits`` [rows, cols] fp32 when given
    instead of recomputing them."""
    n, cols = out.shape
    grid = (cdiv(n, cfg["BLOCK_N"]) * cdiv(cols, cfg["BLOCK_V"]),)
    z = out if logits is None else logits
    args = (h, w, bias if bias is not None else w, ids, lse, g, g if ge is None else ge, ent, out, z, n, cols,
            h.shape[1], h.stride(0), w.stride(0), out.stride(0), col0, 1.0 / temperature, z.stride(0))  # fmt: skip
    tma = logits is None and logits_tile.use_tma(backend.device_arch(h.device), h.element_size(), h, w)
    launch(logprob_grad_logits.logprob_grad_logits_kernel, grid, args, cfg, h.device, HAS_BIAS=bias is not None,
           ENTROPY_GRAD=ge is not None, FROM_SCRATCH=logits is not None, PRECISION=precision, USE_TMA=tma)  # fmt: skip


def _backward_triton(grad_logp, grad_entropy, hidden, weight, bias, token_ids, lse, entropy, temperature):
    N, H = hidden.shape
    V = weight.shape[0]
    arch, precision = backend.device_arch(hidden.device), precision_for(hidden)
    cfg = logprob_grad_logits.config(hidden.element_size(), arch, precision)
    mm = matmul.config(hidden.element_size(), arch, precision)
    rows, cols = grad_blocks(N, V, hidden.element_size(), cfg["BLOCK_N"], cfg["BLOCK_V"])
    hidden_accumulates = cols < V  # blocks split the vocab: d hidden sums over them, in fp32
    dev = hidden.device
    d_hidden = torch.zeros((N, H), dtype=torch.float32, device=dev) if hidden_accumulates else _alloc.empty(
        (N, H), hidden.dtype, dev)  # fmt: skip
    d_weight = torch.zeros((V, H), dtype=torch.float32, device=dev) if rows < N else _alloc.empty(
        (V, H), weight.dtype, dev)  # fmt: skip
    d_bias32 = torch.zeros((V,), dtype=torch.float32, device=dev) if bias is not None else None
    gz = _alloc.empty((rows, cols), hidden.dtype, dev)
    grad_logp = grad_logp.float().contiguous()
    with_eg = grad_entropy is not None
    ge = grad_entropy.float().contiguous() if with_eg else grad_logp
    ent = entropy.float().contiguous() if with_eg else grad_logp
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        h = hidden[r0:r1]
        for v0 in range(0, V, cols):
            v1 = min(V, v0 + cols)
            w, g = weight[v0:v1], gz[: r1 - r0, : v1 - v0]
            grad_logits(h, w, bias[v0:v1] if bias is not None else None, token_ids[r0:r1], lse[r0:r1],
                        grad_logp[r0:r1], ge[r0:r1] if with_eg else None, ent[r0:r1], g, v0, temperature, cfg,
                        precision)  # fmt: skip
            launch_matmul(g, w, d_hidden[r0:r1], hidden_accumulates, mm, precision)  # d hidden (+)= G @ W
            launch_matmul(g.T, h, d_weight[v0:v1], rows < N, mm, precision)  # d weight (+)= G^T @ H
            if d_bias32 is not None:
                d_bias32[v0:v1] += torch.sum(g, dim=0, dtype=torch.float32)  # fp32 sum, no fp32 copy of g
    d_bias = None if d_bias32 is None else d_bias32.to(bias.dtype)
    return d_hidden.to(hidden.dtype), d_weight.to(weight.dtype), d_bias


def logprob_stats_backward(grad_logp, grad_entropy, hidden, weight, bias, token_ids, lse, entropy, temperature):
    if hidden.shape[0] == 0:
        db = None if bias is None else torch.zeros_like(bias)
        return torch.zeros_like(hidden), torch.zeros_like(weight), db
    if backend.on_cpu(hidden, "token_logprob_stats_backward"):
        return lm_head_cpu.backward(grad_logp, grad_entropy, hidden, weight, bias, token_ids, lse, entropy, temperature)
    return _backward_triton(grad_logp, grad_entropy, hidden, weight, bias, token_ids.long(), lse, entropy, temperature)


def _cpu_per_token(t, N: int) -> bool:
    return isinstance(t, _TENSOR) and t.is_cpu and t.dtype in GRAD_DTYPES and t.shape == (N,)


def validate_backward(grad_logp, grad_entropy, lse, entropy, hidden) -> None:
    """The backward's per-token inputs: [N] floating tensors on hidden's device (grad_entropy may be None).
    ``validate`` checks the rest; both run before the kernels read any pointer."""
    N = hidden.shape[0]
    if hidden.is_cpu and _cpu_per_token(grad_logp, N) and _cpu_per_token(lse, N) and _cpu_per_token(entropy, N) and (
            grad_entropy is None or _cpu_per_token(grad_entropy, N)):  # fmt: skip
        return
    for name, t in (("grad_logp", grad_logp), ("grad_entropy", grad_entropy), ("lse", lse), ("entropy", entropy)):
        if t is None and name == "grad_entropy":
            continue
        if isinstance(t, _TENSOR) and t.dtype in GRAD_DTYPES and t.dim() == 1 and t.shape[0] == N and (
                same_device(hidden, t)):  # fmt: skip
            continue
        check_tensor(name, t)
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != N:
            raise ValueError(f"{name} must have shape [N] = [{N}] (one value per hidden row), got {tuple(t.shape)}")
        if not same_device(hidden, t):
            raise ValueError(f"{name} must be on hidden's device {hidden.device}, got {t.device}")


# ---- torch.library ops ------------------------------------------------------------------------------


def _fake_backward(grad_logp, grad_entropy, hidden, weight, bias, token_ids, lse, entropy, temperature):
    validate(hidden, weight, bias, token_ids, temperature)
    validate_backward(grad_logp, grad_entropy, lse, entropy, hidden)
    d_bias = torch.empty_like(bias) if bias is not None else hidden.new_empty((0,))
    return torch.empty_like(hidden), torch.empty_like(weight), d_bias


def _backward_samples(device: str):
    for sample in _samples(device):
        hidden, weight, bias, ids, temperature, _ = (t.detach() if isinstance(t, torch.Tensor) else t
                                                     for t in sample.args)  # fmt: skip
        _, lse, entropy = logprob_stats(hidden, weight, bias, ids, temperature, True)
        g = torch.randn_like(lse)
        yield Sample((g, None, hidden, weight, bias, ids, lse, entropy, temperature))
        yield Sample((g, torch.randn_like(lse), hidden, weight, bias, ids, lse, entropy, temperature))


@define_op("token_logprob_stats_backward", fake=_fake_backward, samples=_backward_samples)
def _stats_backward_op(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    token_ids: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    validate(hidden, weight, bias, token_ids, temperature)
    validate_backward(grad_logp, grad_entropy, lse, entropy, hidden)
    dh, dw, db = logprob_stats_backward(
        grad_logp, grad_entropy, hidden, weight, bias, token_ids, lse, entropy, temperature
    )
    return dh, dw, (db if db is not None else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, token_ids, temperature, return_entropy = inputs
    _, lse, entropy = output
    ctx.save_for_backward(hidden, weight, bias, token_ids, lse, entropy)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(lse)
    if not return_entropy:
        ctx.mark_non_differentiable(entropy)  # zeros, not an entropy


def _backward(ctx, grad_logp, _grad_lse, grad_entropy):
    hidden, weight, bias, token_ids, lse, entropy = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    dh, dw, db = _stats_backward_op(
        grad_logp, grad_entropy, hidden, weight, bias, token_ids, lse, entropy, ctx.temperature
    )
    return dh, dw, (db if bias is not None else None), None, None, None


def _fake_forward(hidden, weight, bias, token_ids, temperature, return_entropy):
    validate(hidden, weight, bias, token_ids, temperature)
    n = hidden.shape[0]
    return tuple(hidden.new_empty((n,), dtype=torch.float32) for _ in range(3))


def _samples(device: str):
    hidden = torch.randn(9, 16, device=device)
    weight = torch.randn(40, 16, device=device) * 0.5
    bias, ids = torch.randn(40, device=device), torch.randint(0, 40, (9,), device=device)
    yield Sample((hidden, weight, bias, ids, 0.9, True))
    yield Sample((hidden.clone().requires_grad_(), weight.clone().requires_grad_(), None, ids.int(), 1.0, False))


@define_op(
    "token_logprob_stats", fake=_fake_forward, backward=_backward, setup_context=_setup_context, samples=_samples
)
def _stats_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    token_ids: torch.Tensor,
    temperature: float,
    return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    validate(hidden, weight, bias, token_ids, temperature)
    return logprob_stats(hidden, weight, bias, token_ids, temperature, return_entropy)


def token_logprob_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Differentiable fused LM head + log-softmax gather.

    Args:
        hidden: ``[N, H]`` bf16 / fp16 / fp32, unit stride in the last dim.
        weight: ``[V, H]`` same dtype (``lm_head.weight``), unit stride in the last dim.
        token_ids: ``[N]`` int64 / int32, every id in ``[0, V)``.
        bias: optional ``[V]``, same dtype.
        temperature: logits are divided by it before the softmax (a runtime value: no recompile).
        return_entropy: also compute the entropy of each row's distribution (one extra FMA per logit).

    Returns:
        ``(logp [N] fp32, lse [N] fp32, entropy [N] fp32)``. ``logp`` and (with ``return_entropy``) ``entropy``
        are differentiable w.r.t. hidden, weight and bias, both through the same fused backward (so an
        entropy bonus costs no extra pass); ``lse`` has no gradient; ``entropy`` is zeros without
        ``return_entropy``.
    """
    return _stats_op(hidden, weight, bias, token_ids, temperature, return_entropy)


@torch.no_grad()
def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``token_ids`` for the old / reference policy, without gradients or full logits.

    Args:
        hidden: ``[..., H]`` (e.g. ``[B, T, H]``) bf16 / fp16 / fp32; weight ``[V, H]`` same dtype.
        token_ids: ``[...]`` matching ``hidden``'s leading dims, ids in ``[0, V)``.

    Returns:
        ``logp [...]`` fp32, and ``entropy [...]`` fp32 when ``return_entropy``.
    """
    lead = hidden.shape[:-1]
    if tuple(token_ids.shape) != tuple(lead):
        raise ValueError(
            f"token_ids must have shape {tuple(lead)} (hidden's leading dims), got {tuple(token_ids.shape)}"
        )
    logp, _, entropy = token_logprob_stats(
        hidden.reshape(-1, hidden.shape[-1]), weight, token_ids.reshape(-1),
        bias=bias, temperature=temperature, return_entropy=return_entropy,
    )  # fmt: skip
    return (logp.view(lead), entropy.view(lead)) if return_entropy else logp.view(lead)
