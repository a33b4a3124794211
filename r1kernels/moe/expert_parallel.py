"""Expert parallelism over torch.distributed: the routed experts are sharded by rank (rank r holds experts
[r * E / W, (r + 1) * E / W)), each rank's tokens travel to the ranks that hold their experts and back.

    dispatch: slots sorted by destination rank (``permutation_index`` over ranks, stable), token counts
              exchanged first (so every buffer is exact), then one all-to-all of the rows and one of their
              local expert ids
    combine:  the reverse all-to-all of the expert outputs, then ``moe_unpermute`` with the routing weights

Both all-to-alls are autograd-aware (the backward is the reverse exchange), so gradients reach the hidden
states, the routing weights and every rank's experts. NCCL on GPUs, gloo on the CPU; no atomics anywhere, so
results are deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from r1kernels.moe.permutation import PermutationIndex, permutation_index
from r1kernels.moe.permute import moe_permute
from r1kernels.moe.unpermute import moe_unpermute


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` split by ``send`` go to the ranks in order; ``recv`` rows come back from each."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.splits = (send, recv, group)
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send, recv, group = ctx.splits
        out = grad.new_empty((sum(send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), send, recv, group=group)
        return out, None, None, None


class Dispatched(NamedTuple):
    """What ``combine`` needs to bring the expert outputs home."""

    index: PermutationIndex  # this rank's slots sorted by destination rank
    send: list[int]  # rows sent to each rank
    recv: list[int]  # rows received from each rank


def experts_per_rank(num_experts: int, group) -> int:
    world = dist.get_world_size(group)
    if num_experts % world:
        raise ValueError(f"the experts ({num_experts}) must split evenly over the {world} ranks of the group")
    return num_experts // world


def dispatch(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, group=None):
    """Send each routed (token, slot) row of ``x [T, H]`` to the rank that holds its expert.

    Returns ``(rows [R, H], local_ids [R] int32, Dispatched)``: the rows this rank's experts must process, in
    order of source rank then source slot, and each row's expert id local to this rank (0 .. E/W - 1).
    Differentiable w.r.t. x. Synchronises the host once (the exchanged counts size the buffers exactly).
    """
    per_rank = experts_per_rank(num_experts, group)
    world = dist.get_world_size(group)
    dest = torch.where(expert_ids >= 0, expert_ids // per_rank, -1).to(torch.int32)
    index = permutation_index(dest, world, num_rows=expert_ids.numel())
    send_counts = index.counts.to(torch.int64)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    used = sum(send)
    rows = _AllToAll.apply(moe_permute(x, index)[:used], send, recv, group)
    slot_expert = expert_ids.reshape(-1).index_select(0, index.source[:used].long()) % per_rank
    local_ids = slot_expert.new_empty(sum(recv))
    dist.all_to_all_single(local_ids, slot_expert.contiguous(), recv, send, group=group)
    return rows, local_ids.to(torch.int32), Dispatched(index, send, recv)


def combine(expert_out: torch.Tensor, dispatched: Dispatched, weights: torch.Tensor, group=None) -> torch.Tensor:
    """Bring ``expert_out [R, H]`` (``dispatch``'s row order) home and sum each token's k outputs with its
    routing ``weights [T, k]`` (``moe_unpermute``). Differentiable w.r.t. expert_out and weights."""
    back = _AllToAll.apply(expert_out, dispatched.recv, dispatched.send, group)
    total = dispatched.index.source.shape[0]
    if back.shape[0] < total:  # rows of unrouted slots sit past the sent ones; unpermute never reads them
        back = torch.cat([back, back.new_zeros((total - back.shape[0], back.shape[1]))])
    return moe_unpermute(back, dispatched.index, weights)
