"""Grouped FP8 weight-gradient GEMM over MoE expert segments (DeepGEMM's "k-grouped" wgrad):
dW[g] [N, K] = dY_g.T @ X_g over the tokens of expert g, where the tokens come in the contiguous layout
(sorted by expert, 128-token-aligned segments, ``m_indices`` -1 on padding rows)."""

from __future__ import annotations

import torch

from r1kernels import _alloc, backend, cpu_caps
from r1kernels._checks import cdiv, check_tensor
from r1kernels._ext import ext
from r1kernels._ops import Sample, define_op
from r1kernels.fp8.gemm_nt import (
    BLOCK,
    CPU_SMALL_ROWS,
    cpu_gemm,
    gemm_problem,
    ids_ok,
    launch_gemm,
    read_operands,
    validate,
)
from r1kernels.fp8.grouped_gemm_nt import SEGMENT, check_segment_ids

_OP = "fp8_grouped_wgrad_gemm"
_NOT_CONTIGUOUS = ("m_indices: each expert's tokens must form one contiguous run of 128-token blocks (the contiguous "
                   "layout, sorted by expert)")  # fmt: skip


def validate_grouped(a, a_scales, b, b_scales, m_indices, num_groups, c) -> None:
    read = read_operands(a, a_scales, b, b_scales, torch.float32, 2, 2, b_tile_rows=1)
    if (read is not None and c is None and ids_ok(m_indices, read[0][1], a) and read[0][1] % SEGMENT == 0
            and type(num_groups) is int and num_groups >= 0):  # fmt: skip
        return  # the usual case in one read; else the checks below name what is wrong
    validate(a, a_scales, b, b_scales, torch.float32, None, b_tile_rows=1)
    check_tensor("m_indices", m_indices, dtypes=(torch.int32,), ndim=1, contiguous=True)
    T = a.shape[1]
    if m_indices.shape[0] != T or m_indices.device != a.device or T % SEGMENT:
        raise ValueError(f"m_indices must hold one expert id per token (a.shape[1] = {T}, a multiple of {SEGMENT}) "
                         f"on {a.device}, got {tuple(m_indices.shape)} on {m_indices.device}")  # fmt: skip
    if not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups must be a non-negative int, got {num_groups!r}")
    if c is not None:
        check_tensor("c", c, dtypes=(torch.float32,), ndim=3, contiguous=True)
        expected = (num_groups, a.shape[0], b.shape[0])
        if tuple(c.shape) != expected or c.device != a.device:
            raise ValueError(f"c must be [G, N, K] = {expected} on {a.device}, got {tuple(c.shape)} on {c.device}")


def token_ranges(m_indices: torch.Tensor, num_groups: int, real_end: bool = False) -> torch.Tensor:
    """[G, 2] int32 (first token, end token) of each expert's segment, (0, 0) for an expert with no tokens, for
    ids that pass ``check_segment_ids``. The segments must be contiguous: checked in the same C++ pass for CPU
    tensors, on the device (no host synchronisation) for CUDA ones. ``real_end`` (CPU tensors): each end at the
    expert's last real token + 1, rounded up to 16, instead of its segment's end (the padding past it adds zeros:
    a decode step's one token per expert is then a 16-token product, not a 128-token one)."""
    if m_indices.is_cpu:
        ranges = torch.empty(num_groups, 2, dtype=torch.int32)
        if not ext().token_ranges_cpu(m_indices=m_indices.data_ptr(), rows=m_indices.shape[0], experts=num_groups,
                                      segment=SEGMENT, real_end=real_end, ranges=ranges.data_ptr()):  # fmt: skip
            raise ValueError(_NOT_CONTIGUOUS)
        return ranges
    return token_ranges_torch(m_indices, num_groups)


def token_ranges_torch(m_indices: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``token_ranges`` in device-side torch ops (CUDA tensors: no synchronisation)."""
    block_ids = m_indices.view(-1, SEGMENT).amax(1)  # one expert (or -1: all padding) per 128-token block
    nblocks = block_ids.shape[0]
    bins = torch.where(block_ids >= 0, block_ids, num_groups).long()  # padding blocks into a spare bin
    index = torch.arange(nblocks, device=m_indices.device)
    first = torch.full((num_groups + 1,), nblocks, device=m_indices.device).scatter_reduce(0, bins, index, "amin")
    last = torch.full((num_groups + 1,), -1, device=m_indices.device).scatter_reduce(0, bins, index, "amax") + 1
    count = torch.zeros(num_groups + 1, dtype=torch.long, device=m_indices.device).scatter_add(
        0, bins, torch.ones_like(index)
    )
    present = count[:num_groups] > 0
    ok = ((last - first)[:num_groups] == count[:num_groups]) | ~present
    torch._assert_async(ok.all(), _NOT_CONTIGUOUS)
    ranges = torch.stack([first[:num_groups], last[:num_groups]], 1) * SEGMENT
    return torch.where(present[:, None], ranges, 0).to(torch.int32)


def _cpu(a, a_scales, b, b_scales, m_indices, out, c) -> None:
    """On AMX: one C++ call (the ids' check, each expert's range, every product read in place; per expert, views of
    a, b, their scales, out and c cost ~1.5 us each, more than the product of a decode step's one token). Else per
    expert, up to its last real token (an end need not close a 128-token scale block), experts without tokens in
    one op."""
    G = out.shape[0]
    if cpu_caps.amx_bf16() and a.shape[0] > CPU_SMALL_ROWS:
        (M, T), N = a.shape, b.shape[0]
        # one expert's [M, N] block of out and of c (the C++ steps between experts)
        problem = gemm_problem(1, M, N, T, 1, a.stride(), b.stride(), a_scales.stride(), b_scales.stride(), N, (N, 1))
        status = ext().fp8_grouped_wgrad_amx_cpu(a.data_ptr(), a_scales.data_ptr(), b.data_ptr(), b_scales.data_ptr(),
                                                 0 if c is None else c.data_ptr(), out.data_ptr(), m_indices.data_ptr(),
                                                 T, G, SEGMENT, problem)  # fmt: skip
        if int(status) != 0:  # not GroupedWgradStatus.ok: the checks below name what is wrong
            check_segment_ids(m_indices, G)
            token_ranges(m_indices, G)
            raise AssertionError(f"fp8_grouped_wgrad_amx_cpu reported {status} but the ids pass the checks")
        return
    check_segment_ids(m_indices, G)
    present = [(g, lo, hi) for g, (lo, hi) in enumerate(token_ranges(m_indices, G, real_end=True).tolist()) if hi > lo]
    if len(present) < G:
        absent = torch.tensor(sorted(set(range(G)) - {g for g, _, _ in present}))
        if c is None:
            out.index_fill_(0, absent, 0.0)
        else:
            out.index_copy_(0, absent, c.index_select(0, absent))
    for g, lo, hi in present:
        cols = slice(lo // BLOCK, cdiv(hi, BLOCK))
        cpu_gemm(a[:, lo:hi], a_scales[:, cols], b[:, lo:hi], b_scales[:, cols], out[g], None if c is None else c[g],
                 b_tile_rows=1)  # fmt: skip


def _fake(a, a_scales, b, b_scales, m_indices, num_groups, c):
    validate_grouped(a, a_scales, b, b_scales, m_indices, num_groups, c)
    return a.new_empty((num_groups, a.shape[0], b.shape[0]), dtype=torch.float32)


def _samples(device: str):
    from r1kernels.fp8.quantize_transposed import quantize_transposed

    ids = torch.tensor([1] * 100 + [-1] * 28 + [3] * 256, dtype=torch.int32, device=device)
    a, sa = quantize_transposed(torch.randn(384, 70, device=device), m_indices=ids)
    b, sb = quantize_transposed(torch.randn(384, 144, device=device), m_indices=ids)
    checks = ("test_faketensor", "test_aot_dispatch_dynamic")
    yield Sample((a, sa, b, sb, ids, 4, None), checks)
    yield Sample((a, sa, b, sb, ids, 4, torch.randn(4, 70, 144, device=device)), checks)


@define_op(_OP, fake=_fake, samples=_samples)
def _grouped_wgrad_op(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    m_indices: torch.Tensor,
    num_groups: int,
    c: torch.Tensor | None,
) -> torch.Tensor:
    validate_grouped(a, a_scales, b, b_scales, m_indices, num_groups, c)
    out = _alloc.empty((num_groups, a.shape[0], b.shape[0]), torch.float32, a.device)
    if out.numel() == 0:
        return out
    if backend.on_cpu(a, _OP):
        _cpu(a, a_scales, b, b_scales, m_indices, out, c)  # checks the ids before writing
    else:
        check_segment_ids(m_indices, num_groups)
        launch_gemm(a, a_scales, b, b_scales, out, c, k_ranges=token_ranges(m_indices, num_groups), b_row_scales=True)
    return out


def grouped_wgrad_gemm(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    m_indices: torch.Tensor,
    num_groups: int,
    *,
    c: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dW[g] = sum over tokens t of expert g of dY[t].T X[t]`` in fp32: MoE experts' weight gradients.

    Args:
        a: ``dY.T [N, T] float8_e4m3fn`` with ``a_scales [N, T/128] float32`` and b: ``X.T [K, T]`` with
            ``b_scales [K, T/128]``, both from ``quantize_transposed(..., m_indices=m_indices)`` (which zeroes
            the padding tokens: a padding token's values would otherwise enter its expert's sum).
        m_indices: ``[T] int32`` expert of each token in the contiguous layout (T a multiple of 128, tokens
            sorted by expert in 128-aligned segments, -1 on padding rows), as for
            ``grouped_gemm_nt_contiguous``; checked on the device for CUDA tensors.
        num_groups: G, the number of experts; an expert with no tokens gets a zero gradient.
        c: optional ``[G, N, K] float32`` contiguous, added to the result (gradient accumulation).

    Returns ``[G, N, K] float32``. GPU: one launch over (expert, N tile, K tile) programs, each summing over its
    expert's token range (found on the device: no host synchronisation). CPU: per expert, up to its last real token
    (rounded up to 16; the zeroed padding past it adds nothing), on AMX tiles where the CPU has them.
    """
    return _grouped_wgrad_op(a, a_scales, b, b_scales, m_indices, num_groups, c)
