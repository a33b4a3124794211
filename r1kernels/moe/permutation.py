"""The MoE permutation index: each (token, slot)'s row in the expert-sorted layout, and each row's source
slot and expert, with segments aligned for the grouped GEMMs."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from r1kernels import _alloc
from r1kernels._checks import cdiv, check_tensor
from r1kernels._ext import ext, has_cuda_kernels
from r1kernels._launch import cuda_stream, device_guard
from r1kernels._ops import Sample, define_op, plain_eager

_OP = "moe_permutation_index"


class PermutationIndex(NamedTuple):
    """Where every routed (token, slot) lives in the expert-sorted layout.

    counts: ``[E] int32`` slots routed to each expert. offsets: ``[E + 1] int64`` each expert's first row
    (segments aligned to ``align`` rows; ``offsets[E]`` = rows in use). row_of: ``[T, k] int32`` the row of
    each slot (-1: not routed). source: ``[R] int32`` the flat slot ``t * k + j`` of each row (-1: padding).
    row_expert: ``[R] int32`` the expert of each row (-1: padding), DeepGEMM's ``m_indices``.
    """

    counts: torch.Tensor
    offsets: torch.Tensor
    row_of: torch.Tensor
    source: torch.Tensor
    row_expert: torch.Tensor


def max_rows(slots: int, num_experts: int, align: int) -> int:
    """Rows that always suffice: every non-empty expert (at most min(E, slots)) pads up to align - 1 rows."""
    if align == 1:
        return slots
    return cdiv(slots + min(num_experts, slots) * (align - 1), align) * align


def validate(expert_ids, num_experts, align, num_rows) -> None:
    check_tensor("expert_ids", expert_ids, dtypes=(torch.int32,), ndim=2, contiguous=True)
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be a positive int, got {align!r}")
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    if expert_ids.numel() >= 2**31:
        raise ValueError(f"expert_ids must have fewer than 2**31 slots, got {expert_ids.numel()}")


def _ids_error(expert_ids, num_experts) -> ValueError:
    lo, hi = (int(v) for v in torch.aminmax(expert_ids))
    return ValueError(f"expert_ids must lie in [-1, num_experts) = [-1, {num_experts}), got values in [{lo}, {hi}]")


def _check_on_device(expert_ids, num_experts, offsets, num_rows) -> None:
    """ids in [-1, E) and the aligned total within num_rows, checked on the device: no host synchronisation."""
    torch._assert_async(((expert_ids >= -1) & (expert_ids < num_experts)).all(),
                        "expert_ids must lie in [-1, num_experts)")  # fmt: skip
    torch._assert_async(offsets[-1] <= num_rows, "num_rows is too small for the aligned segments")


@functools.lru_cache(maxsize=256)
def _problem(slots, experts, align, rows):
    return ext().PermutationProblem(slots=slots, experts=experts, align=align, rows=rows)


def _outputs(expert_ids, num_experts, num_rows):
    dev = expert_ids.device
    return PermutationIndex(
        counts=_alloc.empty((num_experts,), torch.int32, dev),
        offsets=_alloc.empty((num_experts + 1,), torch.int64, dev),
        row_of=_alloc.empty(tuple(expert_ids.shape), torch.int32, dev),
        source=_alloc.empty((num_rows,), torch.int32, dev),
        row_expert=_alloc.empty((num_rows,), torch.int32, dev),
    )


def _torch_index(expert_ids, num_experts, align, out) -> None:
    """The same index from torch ops (a stable sort), for GPUs without the CUDA build."""
    flat = expert_ids.reshape(-1).long()
    keys = torch.where(flat < 0, num_experts, flat)
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=num_experts + 1)[:num_experts]
    aligned = (counts + align - 1) // align * align
    out.counts.copy_(counts)
    out.offsets.zero_()
    torch.cumsum(aligned, 0, out=out.offsets[1:])
    starts = torch.cumsum(counts, 0) - counts
    sorted_keys = keys[order]
    routed = sorted_keys < num_experts
    e = sorted_keys.clamp_max(num_experts - 1)
    rows = out.offsets[e] + (torch.arange(flat.numel(), device=flat.device) - starts[e])
    # unrouted slots write into a spare last row that is dropped (no boolean indexing: no host sync)
    rows = torch.where(routed, rows, out.source.shape[0])
    out.row_of.view(-1).scatter_(0, order, torch.where(routed, rows, -1).to(torch.int32))
    spare = out.source.shape[0] + 1
    for target, values in ((out.source, order), (out.row_expert, e)):
        target.copy_(torch.full((spare,), -1, dtype=torch.int32, device=flat.device).scatter_(
            0, rows, values.to(torch.int32))[:-1])  # fmt: skip


def _index_cpu(expert_ids, num_experts, num_rows, ptrs) -> int:
    """The C++ sort (it checks the ids before writing anything); returns the aligned total of rows."""
    used = ext().permutation_index_cpu(**ptrs)
    if used < 0:
        raise _ids_error(expert_ids, num_experts)
    if used > num_rows:
        raise ValueError(f"num_rows ({num_rows}) is too small: the aligned segments need {used}")
    return used


def _exact_on_cpu(expert_ids, num_experts, align) -> PermutationIndex:
    """Eager CPU call without ``num_rows``: the sort into outputs sized by the bound, then ``source`` and
    ``row_expert`` narrowed to the aligned total (known on the CPU without a synchronisation)."""
    num_rows = max_rows(expert_ids.numel(), num_experts, align)
    validate(expert_ids, num_experts, align, num_rows)
    out = _outputs(expert_ids, num_experts, num_rows)
    used = _index_cpu(expert_ids, num_experts, num_rows, _pointers(expert_ids, num_experts, align, num_rows, out))
    if used == num_rows:  # every slot routed, no padding (align 1): nothing to narrow, and a view costs ~1 us
        return out
    return PermutationIndex(out.counts, out.offsets, out.row_of, out.source[:used], out.row_expert[:used])


def _pointers(expert_ids, num_experts, align, num_rows, out) -> dict:
    return dict(expert_ids=expert_ids.data_ptr(), problem=_problem(expert_ids.numel(), num_experts, align, num_rows),
                counts=out.counts.data_ptr(), offsets=out.offsets.data_ptr(), row_of=out.row_of.data_ptr(),
                source=out.source.data_ptr(), row_expert=out.row_expert.data_ptr())  # fmt: skip


def _fake(expert_ids, num_experts, align, num_rows):
    validate(expert_ids, num_experts, align, num_rows)
    return tuple(_outputs(expert_ids, num_experts, num_rows))


def _samples(device: str):
    ids = torch.randint(0, 6, (37, 3), dtype=torch.int32, device=device)
    ids[5, 1] = -1
    yield Sample((ids, 8, 1, max_rows(ids.numel(), 8, 1)))
    yield Sample((ids, 8, 16, max_rows(ids.numel(), 8, 16)))


@define_op(_OP, fake=_fake, samples=_samples, triton=False)
def _permutation_index_op(
    expert_ids: torch.Tensor, num_experts: int, align: int, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    validate(expert_ids, num_experts, align, num_rows)
    out = _outputs(expert_ids, num_experts, num_rows)
    ptrs = _pointers(expert_ids, num_experts, align, num_rows, out)
    if expert_ids.device.type == "cpu":
        _index_cpu(expert_ids, num_experts, num_rows, ptrs)
    elif has_cuda_kernels():
        with device_guard(expert_ids.device):
            scratch = torch.empty(ext().permutation_index_workspace_cuda(problem=ptrs["problem"]), dtype=torch.uint8,
                                  device=expert_ids.device)  # fmt: skip
            ext().permutation_index_cuda(**ptrs, workspace=scratch.data_ptr(), workspace_bytes=scratch.numel(),
                                         stream=cuda_stream(expert_ids.device))  # fmt: skip
        _check_on_device(expert_ids, num_experts, out.offsets, num_rows)
    else:
        _torch_index(expert_ids, num_experts, align, out)
        _check_on_device(expert_ids, num_experts, out.offsets, num_rows)
    return tuple(out)


def permutation_index(
    expert_ids: torch.Tensor, num_experts: int, *, align: int = 1, num_rows: int | None = None
) -> PermutationIndex:
    """The expert-sorted row layout of routed tokens (stable, deterministic, no host synchronisation on a GPU).

    Args:
        expert_ids: ``[T, k] int32`` each token's experts (``route``'s ids); -1 marks a slot routed nowhere
            here (dropped, or another rank's expert).
        num_experts: E. align: each expert's segment starts on a multiple of this many rows (128 for
            ``r1kernels.fp8.grouped_gemm_nt_contiguous``; 1 for none).
        num_rows: rows R of ``source`` / ``row_expert``. Default: on the CPU exactly the aligned total; on a GPU
            the bound ``max_rows`` (no host synchronisation: the tail past ``offsets[E]`` is padding).

    Returns a ``PermutationIndex``. Within an expert, rows follow the flat slot order ``t * k + j``.
    """
    if num_rows is None and expert_ids.device.type == "cpu" and plain_eager((expert_ids,)):
        return _exact_on_cpu(expert_ids, num_experts, align)
    if num_rows is None:
        num_rows = max_rows(expert_ids.numel(), num_experts, align)
    return PermutationIndex(*_permutation_index_op(expert_ids, num_experts, align, num_rows))
