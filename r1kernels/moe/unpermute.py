"""MoE unpermute: expert-sorted rows back to tokens, each token the routing-weighted sum of its k rows, with
autograd for the rows and the routing weights."""

from __future__ import annotations

import torch

from r1kernels._checks import check_tensor
from r1kernels._ops import Sample, define_op
from r1kernels.moe.permutation import PermutationIndex
from r1kernels.moe.permute import DTYPES, validate_index
from r1kernels.moe.row_launchers import combine_rows, gather_rows, row_dot

_OP = "moe_unpermute"


def _validate(rows, source, row_of, weights) -> None:
    check_tensor("rows", rows, dtypes=DTYPES, ndim=2)
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        raise ValueError(f"rows must have unit stride in its last dimension, got strides {rows.stride()}")
    check_tensor("weights", weights, dtypes=(torch.float32,), ndim=2, contiguous=True)
    if weights.shape != row_of.shape or weights.device != rows.device:
        raise ValueError(f"weights must be [T, k] = {tuple(row_of.shape)} (index.row_of's shape) on {rows.device}, "
                         f"got {tuple(weights.shape)} on {weights.device}")  # fmt: skip
    if source.shape[0] != rows.shape[0]:
        raise ValueError(f"rows must have index.source's {source.shape[0]} rows, got {rows.shape[0]}")
    validate_index(weights, source, row_of, "weights")


def _fake(rows, source, row_of, weights):
    _validate(rows, source, row_of, weights)
    return rows.new_empty((row_of.shape[0], rows.shape[1]))


def _setup_context(ctx, inputs, output):
    rows, source, row_of, weights = inputs
    ctx.save_for_backward(rows, source, row_of, weights)


def _backward(ctx, grad_out):
    rows, source, row_of, weights = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_rows = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_rows = gather_rows(grad_out.to(rows.dtype), source, row_of.shape[1], weights, _OP)
    if ctx.needs_input_grad[3]:
        grad_weights = row_dot(grad_out, rows, row_of, _OP)
    return grad_rows, None, None, grad_weights


def _samples(device: str):
    from r1kernels.moe.permutation import permutation_index

    ids = torch.randint(0, 8, (37, 3), dtype=torch.int32, device=device)
    ids[4, 2] = -1
    index = permutation_index(ids, 8, align=16)
    rows = torch.randn(index.source.shape[0], 300, device=device)
    yield Sample((rows, index.source, index.row_of, torch.rand(37, 3, device=device)))


@define_op(_OP, fake=_fake, backward=_backward, setup_context=_setup_context, samples=_samples)
def _unpermute_op(
    rows: torch.Tensor, source: torch.Tensor, row_of: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    _validate(rows, source, row_of, weights)
    return combine_rows(rows, row_of, weights, _OP)


def moe_unpermute(rows: torch.Tensor, index: PermutationIndex, weights: torch.Tensor) -> torch.Tensor:
    """Tokens from expert-sorted rows: ``out[t] = sum_j weights[t, j] * rows[index.row_of[t, j]]``.

    Args:
        rows: ``[R, H]`` bfloat16 / float16 / float32 expert outputs in ``index``'s layout (padding rows are
            never read, so they may hold anything).
        index: the ``permutation_index`` the rows were permuted with.
        weights: ``[T, k]`` float32 routing weights (``route``'s); unrouted slots (row -1) contribute nothing.

    Returns ``[T, H]`` in rows' dtype, each sum in fp32 over the slots in order (deterministic). Differentiable
    w.r.t. rows (a weighted gather; padding rows get zero gradient) and weights (``<grad[t], rows[r]>``).
    """
    return _unpermute_op(rows, index.source, index.row_of, weights)
