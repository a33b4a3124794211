"""DeepSeek-V3 routing: router logits -> (weights, expert ids) per token, with autograd for the weights."""

from __future__ import annotations

import functools

import torch

from r1kernels import _alloc
from r1kernels._checks import check_tensor
from r1kernels._ext import cpp_dtype, ext, has_cuda_kernels
from r1kernels._launch import cuda_stream, device_guard
from r1kernels._ops import Sample, define_op
from r1kernels.moe import reference

_OP = "moe_route"
SCORE_FUNCS = ("sigmoid", "softmax")
MAX_EXPERTS = 512


def validate(logits, correction_bias, top_k, n_group, topk_group, score_func) -> None:
    check_tensor("logits", logits, dtypes=(torch.float32, torch.bfloat16), ndim=2, contiguous=True)
    E = logits.shape[1]
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"logits must have between 1 and {MAX_EXPERTS} experts (columns), got {E}")
    if correction_bias is not None:
        check_tensor("correction_bias", correction_bias, dtypes=(torch.float32,), ndim=1, contiguous=True)
        if correction_bias.shape[0] != E or correction_bias.device != logits.device:
            raise ValueError(f"correction_bias must be [{E}] on {logits.device}, got {tuple(correction_bias.shape)} "
                             f"on {correction_bias.device}")  # fmt: skip
    for name, v in (("top_k", top_k), ("n_group", n_group), ("topk_group", topk_group)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if E % n_group:
        raise ValueError(f"the number of experts ({E}) must be divisible by n_group ({n_group})")
    if topk_group > n_group:
        raise ValueError(f"topk_group ({topk_group}) must be <= n_group ({n_group})")
    per_group = E // n_group
    if n_group > 1 and per_group < 2:
        raise ValueError(f"each group needs >= 2 experts (its score is the sum of its top 2), got {per_group}")
    if top_k > topk_group * per_group:
        raise ValueError(f"top_k ({top_k}) must be <= the experts in the kept groups (topk_group x E / n_group = "
                         f"{topk_group * per_group}); with n_group = 1 that is k <= E")  # fmt: skip
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")


@functools.lru_cache(maxsize=256)
def _problem(tokens, experts, top_k, n_group, topk_group, scaling, norm, softmax):
    return ext().RouteProblem(tokens=tokens, experts=experts, top_k=top_k, n_group=n_group, topk_group=topk_group,
                              routed_scaling_factor=scaling, norm_topk_prob=norm, softmax=softmax)  # fmt: skip


def _route_torch(logits, bias, top_k, n_group, topk_group, scaling, norm, softmax):
    """For GPUs without the CUDA build: the float64 reference (the same stable-sort selection), cast."""
    weights, ids = reference.route(logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                                   routed_scaling_factor=scaling, norm_topk_prob=norm,
                                   score_func="softmax" if softmax else "sigmoid")  # fmt: skip
    return weights.float(), ids.to(torch.int32)


def _fake(logits, correction_bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob, score_func):
    validate(logits, correction_bias, top_k, n_group, topk_group, score_func)
    T = logits.shape[0]
    return logits.new_empty((T, top_k), dtype=torch.float32), logits.new_empty((T, top_k), dtype=torch.int32)


def _setup_context(ctx, inputs, output):
    logits, _, _, _, _, scaling, norm, score_func = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.options = (scaling, norm, score_func)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_weights, _grad_ids):
    """d weights / d logits through the chosen experts' unbiased scores (the bias only steers the choice)."""
    logits, ids = ctx.saved_tensors
    scaling, norm, score_func = ctx.options
    lg = logits.float()
    scores = torch.sigmoid(lg) if score_func == "sigmoid" else torch.softmax(lg, dim=-1)
    idx = ids.long()
    chosen = scores.gather(1, idx)
    g = grad_weights.float() * scaling
    if norm:
        total = chosen.sum(-1, keepdim=True) + 1e-20
        g = g / total - (g * chosen).sum(-1, keepdim=True) / (total * total)
    d_scores = torch.zeros_like(scores).scatter_(1, idx, g)
    if score_func == "sigmoid":
        d_logits = d_scores * scores * (1 - scores)
    else:
        d_logits = scores * (d_scores - (d_scores * scores).sum(-1, keepdim=True))
    return d_logits.to(logits.dtype), None, None, None, None, None, None, None


def _samples(device: str):
    logits = torch.randn(37, 64, device=device)
    bias = torch.randn(64, device=device) * 0.01
    yield Sample((logits, bias, 6, 8, 4, 2.5, True, "sigmoid"))
    yield Sample((logits.bfloat16(), None, 2, 1, 1, 1.0, False, "softmax"))


@define_op(_OP, fake=_fake, backward=_backward, setup_context=_setup_context, samples=_samples, triton=False)
def _route_op(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
    score_func: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    validate(logits, correction_bias, top_k, n_group, topk_group, score_func)
    T, E = logits.shape
    softmax = score_func == "softmax"
    if logits.device.type == "cuda" and not has_cuda_kernels():
        return _route_torch(logits, correction_bias, top_k, n_group, topk_group, routed_scaling_factor,
                            norm_topk_prob, softmax)  # fmt: skip
    weights = _alloc.empty((T, top_k), torch.float32, logits.device)
    ids = _alloc.empty((T, top_k), torch.int32, logits.device)
    if T == 0:
        return weights, ids
    problem = _problem(T, E, top_k, n_group, topk_group, float(routed_scaling_factor), norm_topk_prob, softmax)
    args = dict(logits=logits.data_ptr(), dtype=cpp_dtype(logits.dtype), problem=problem,
                bias=0 if correction_bias is None else correction_bias.data_ptr(), weights=weights.data_ptr(),
                ids=ids.data_ptr())  # fmt: skip
    if logits.device.type == "cpu":
        ext().route_cpu(**args)
    else:
        with device_guard(logits.device):
            ext().route_cuda(**args, stream=cuda_stream(logits.device))
    return weights, ids


def route(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None = None,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
    norm_topk_prob: bool = True,
    score_func: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's router selection (HF ``DeepseekV3TopkRouter`` / DeepSeek's ``Gate``), per token.

    Args:
        logits: ``[T, E]`` float32 / bfloat16 router logits (``hidden @ gate.weight.T``, fp32 as DeepSeek
            computes them), contiguous; 1 <= E <= 512, any E divisible by ``n_group``.
        correction_bias: optional ``[E]`` float32 ``e_score_correction_bias``: added to the scores for the
            choice only (auxiliary-loss-free balancing), never to the weights.
        top_k: experts per token. n_group / topk_group: the experts form n_group equal groups; a group's score
            is the sum of its two best biased scores and only the best topk_group groups stay eligible.
        routed_scaling_factor: multiplies the weights. norm_topk_prob: divide the chosen scores by their sum
            (+1e-20) first. score_func: ``"sigmoid"`` (V3) or ``"softmax"`` (V2) over the experts.

    Returns:
        ``(weights [T, top_k] float32, expert_ids [T, top_k] int32)``, each token's experts in descending biased
        score. Every ranking (groups and experts) breaks ties toward the lower index, on the CPU and the GPU
        (``torch.topk``'s order on ties is unspecified); experts outside the kept groups are out of the running.
        A NaN score ranks after every number; a token whose chosen scores include NaN gets NaN weights.
        Differentiable w.r.t. ``logits`` (through the weights).

    CPU: C++ (OpenMP over tokens). GPU: a CUDA C++ kernel, one warp per token (a torch fallback without the
    CUDA build).
    """
    return _route_op(logits, correction_bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob,
                     score_func)  # fmt: skip
