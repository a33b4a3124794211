"""MoE permute: token rows into the expert-sorted layout (each routed (token, slot) gets its row), with
autograd; FP8 rows move together with their 1 x 128 scales."""

from __future__ import annotations

import torch

from r1kernels._checks import check_tensor
from r1kernels._ops import Sample, define_op
from r1kernels.moe.permutation import PermutationIndex
from r1kernels.moe.row_launchers import combine_rows, gather_rows

_OP = "moe_permute"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def validate_index(x: torch.Tensor, source: torch.Tensor, row_of: torch.Tensor, x_name: str = "x") -> None:
    check_tensor("index.source", source, dtypes=(torch.int32,), ndim=1, contiguous=True)
    check_tensor("index.row_of", row_of, dtypes=(torch.int32,), ndim=2, contiguous=True)
    if row_of.shape[0] != x.shape[0]:
        raise ValueError(f"index.row_of must have one row per token of {x_name} ({x.shape[0]}), got "
                         f"{tuple(row_of.shape)}")  # fmt: skip
    for name, t in (("index.source", source), ("index.row_of", row_of)):
        if t.device != x.device:
            raise ValueError(f"{name} must be on {x_name}'s device {x.device}, got {t.device}")


def _validate(x, source, row_of) -> None:
    check_tensor("x", x, dtypes=DTYPES, ndim=2)
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"x must have unit stride in its last dimension, got strides {x.stride()}")
    validate_index(x, source, row_of)


def _fake(x, source, row_of):
    _validate(x, source, row_of)
    return x.new_empty((source.shape[0], x.shape[1]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])  # row_of


def _backward(ctx, grad_rows):
    (row_of,) = ctx.saved_tensors
    return combine_rows(grad_rows.contiguous(), row_of, None, _OP), None, None


def _samples(device: str):
    from r1kernels.moe.permutation import permutation_index

    ids = torch.randint(0, 8, (37, 3), dtype=torch.int32, device=device)
    index = permutation_index(ids, 8, align=16)
    yield Sample((torch.randn(37, 300, device=device), index.source, index.row_of))


@define_op(_OP, fake=_fake, backward=_backward, setup_context=_setup_context, samples=_samples)
def _permute_op(x: torch.Tensor, source: torch.Tensor, row_of: torch.Tensor) -> torch.Tensor:
    _validate(x, source, row_of)
    return gather_rows(x, source, row_of.shape[1], None, _OP)


def moe_permute(x: torch.Tensor, index: PermutationIndex) -> torch.Tensor:
    """Rows of ``x`` in the expert-sorted layout of ``index``: ``out[r] = x[index.source[r] // k]``, zero rows
    on padding.

    Args:
        x: ``[T, H]`` bfloat16 / float16 / float32 tokens (unit stride in H).
        index: ``permutation_index(expert_ids, E, ...)`` of the same T tokens (k = expert_ids.shape[1]).

    Returns ``[R, H]`` in x's dtype (R = ``index.source.shape[0]``). Differentiable: the gradient of a token
    is the fp32 sum of its k rows' gradients in slot order (a gather, no atomics: deterministic).
    """
    return _permute_op(x, index.source, index.row_of)


def moe_permute_fp8(
    x_fp8: torch.Tensor, scales: torch.Tensor, index: PermutationIndex
) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_permute`` for FP8 activations: the codes ``[T, H] float8_e4m3fn`` and their ``[T, ceil(H/128)]``
    float32 scales (``quantize_per_token_group``'s, row-major) move together; padding rows get zero codes and
    zero scales. Returns what ``r1kernels.fp8.grouped_gemm_nt_contiguous`` takes with ``index.row_expert``.
    No autograd (FP8 activations are a forward-pass format)."""
    check_tensor("x_fp8", x_fp8, dtypes=(torch.float8_e4m3fn,), ndim=2, contiguous=True)
    check_tensor("scales", scales, dtypes=(torch.float32,), ndim=2, contiguous=True)
    if scales.shape[0] != x_fp8.shape[0] or scales.device != x_fp8.device:
        raise ValueError(f"scales must have one row per row of x_fp8 ({x_fp8.shape[0]}) on {x_fp8.device}, got "
                         f"{tuple(scales.shape)} on {scales.device}")  # fmt: skip
    validate_index(x_fp8, index.source, index.row_of, "x_fp8")
    k = index.row_of.shape[1]
    return gather_rows(x_fp8, index.source, k, None, _OP), gather_rows(scales, index.source, k, None, _OP)
