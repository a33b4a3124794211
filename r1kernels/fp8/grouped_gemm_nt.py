"""Grouped block-scaled FP8 GEMM over MoE expert segments, DeepGEMM's contiguous layout
(``m_grouped_fp8_gemm_nt_contiguous``): the rows of ``a`` come sorted by expert in 128-row-aligned segments and
each row is multiplied by its own expert's weight."""

from __future__ import annotations

import torch

from r1kernels import _alloc, backend
from r1kernels._checks import check_tensor
from r1kernels._ext import ext
from r1kernels._ops import Sample, define_op
from r1kernels.fp8.gemm_nt import (
    CPU_SMALL_ROWS,
    E4M3,
    F32,
    I32,
    cpu_gemm,
    cpu_gemm_small,
    ids_ok,
    launch_gemm,
    read_operands,
    validate_matrices,
)

SEGMENT = 128  # expert segments start on multiples of this many rows (the GEMM's row tile)


def validate(a, a_scales, b, b_scales, m_indices, out_dtype) -> None:
    read = read_operands(a, a_scales, b, b_scales, out_dtype, 2, 3)
    if read is not None:  # the rest of the rules on what it read: the usual case costs one pass
        a_shape, b_shape, _, b_strides = read
        if (ids_ok(m_indices, a_shape[0], a) and b_scales.shape[0] == b_shape[0] and a_shape[0] % SEGMENT == 0
                and b_strides[2] == 1 and b_strides[0] % 16 == 0):  # fmt: skip
            return
    check_tensor("b", b, dtypes=(E4M3,), ndim=3)
    check_tensor("b_scales", b_scales, dtypes=(F32,), ndim=3)
    check_tensor("m_indices", m_indices, dtypes=(I32,), ndim=1, contiguous=True)
    check_tensor("a", a, dtypes=(E4M3,), ndim=2)
    check_tensor("a_scales", a_scales, dtypes=(F32,), ndim=2)
    G = b.shape[0]
    if b_scales.shape[0] != G:
        raise ValueError(f"b_scales must have one [ceil(N/128), ceil(K/128)] block grid per expert ({G}), "
                         f"got shape {tuple(b_scales.shape)}")  # fmt: skip
    validate_matrices(a, a_scales, b, b_scales, out_dtype)  # each expert's operands: the dense GEMM's rules
    if a.shape[0] % SEGMENT:
        raise ValueError(f"a must have a multiple of {SEGMENT} rows (expert segments padded to {SEGMENT}), "
                         f"got {a.shape[0]}")  # fmt: skip
    if m_indices.shape[0] != a.shape[0] or m_indices.is_cpu != a.is_cpu or (
            not a.is_cpu and m_indices.device != a.device):  # fmt: skip
        raise ValueError(f"m_indices must hold one expert id per row of a ({a.shape[0]}) on {a.device}, got "
                         f"{tuple(m_indices.shape)} on {m_indices.device}")  # fmt: skip
    if b.stride(2) != 1 or b.stride(0) % 16:
        raise ValueError(f"b must be [G, N, K] with unit K stride and 16-element-aligned expert stride, got strides "
                         f"{b.stride()}")  # fmt: skip


def check_segment_ids(m_indices: torch.Tensor, G: int) -> int | None:
    """Every id in [-1, G) and each 128-row segment its first row's expert or padding: in one C++ pass for CPU
    tensors (returns the number of real rows), on the device (no synchronisation; returns None) for CUDA ones."""
    if m_indices.is_cpu:
        real = ext().contiguous_segments_cpu(m_indices.data_ptr(), m_indices.shape[0], G, SEGMENT)  # positional
        if real < 0:
            raise ValueError(f"m_indices must lie in [-1, G) = [-1, {G}) with one expert (or -1) per {SEGMENT}-row "
                             "segment")  # fmt: skip
        return real
    tiles = m_indices.view(-1, SEGMENT)
    ok = ((m_indices >= -1) & (m_indices < G)).all() & ((tiles == tiles[:, :1]) | (tiles == -1)).all()
    torch._assert_async(ok, "m_indices must lie in [-1, G) with one expert per 128-row segment")
    return None


def _cpu(a, a_scales, b, b_scales, m_indices, out, real_rows: int) -> None:
    if real_rows <= CPU_SMALL_ROWS:  # few real rows among the padding
        return cpu_gemm_small(a, a_scales, b, b_scales, out, row_expert=m_indices)
    out.zero_()
    for e in torch.unique(m_indices).tolist():
        if e >= 0:
            rows = torch.nonzero(m_indices == e).squeeze(1)
            d = out.new_empty((rows.numel(), out.shape[1]))
            cpu_gemm(a[rows], a_scales[rows], b[e], b_scales[e], d)
            out[rows] = d


def _fake(a, a_scales, b, b_scales, m_indices, out_dtype):
    validate(a, a_scales, b, b_scales, m_indices, out_dtype)
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


def _samples(device: str):
    from r1kernels.fp8.quantize_per_block import quantize_per_block
    from r1kernels.fp8.quantize_per_token_group import quantize_per_token_group

    a, sa = quantize_per_token_group(torch.randn(256, 144, device=device))
    pairs = [quantize_per_block(torch.randn(130, 144, device=device)) for _ in range(3)]
    b, sb = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    ids = torch.tensor([2] * 100 + [-1] * 28 + [0] * 128, dtype=torch.int32, device=device)
    yield Sample((a, sa, b, sb, ids, torch.bfloat16), ("test_faketensor", "test_aot_dispatch_dynamic"))


@define_op("fp8_grouped_gemm_nt_contiguous", fake=_fake, samples=_samples)
def _grouped_op(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    m_indices: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    validate(a, a_scales, b, b_scales, m_indices, out_dtype)
    out = _alloc.empty((a.shape[0], b.shape[1]), out_dtype, a.device)
    if out.numel() == 0:
        return out
    real_rows = check_segment_ids(m_indices, b.shape[0])
    if backend.on_cpu(a, "fp8_grouped_gemm_nt_contiguous"):
        _cpu(a, a_scales, b, b_scales, m_indices, out, real_rows)
    else:
        launch_gemm(a, a_scales, b, b_scales, out, None, m_indices)
    return out


def grouped_gemm_nt_contiguous(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    m_indices: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``D[r] = (a[r] * a_scales[r]) @ (b[e] * b_scales[e]).T`` with ``e = m_indices[r]``; zeros where e = -1.

    DeepGEMM's ``m_grouped_fp8_gemm_nt_contiguous`` layout, what the MoE permutation produces:

    Args:
        a: ``[M, K] float8_e4m3fn`` rows sorted by expert, each expert's segment starting on a multiple of 128
            rows (M a multiple of 128, padding rows between segments); a_scales ``[M, ceil(K/128)] float32``.
        b: ``[G, N, K] float8_e4m3fn`` expert weights; b_scales ``[G, ceil(N/128), ceil(K/128)] float32``.
        m_indices: ``[M] int32`` expert of each row, -1 on padding rows; one expert (or -1) per 128-row segment
            (checked on the device for CUDA tensors: no host synchronisation).
        out_dtype: bfloat16 or float32.

    One launch over (128-row tile, N tile) programs; each tile reads its expert id and skips its K loop on
    padding. K a multiple of 16.
    """
    return _grouped_op(a, a_scales, b, b_scales, m_indices, out_dtype)
