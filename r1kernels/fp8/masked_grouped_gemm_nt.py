"""Grouped block-scaled FP8 GEMM, DeepGEMM's masked layout (``m_grouped_fp8_gemm_nt_masked``): each expert
has a fixed-size slab of rows of which the first ``masked_m[g]`` hold tokens (the decode / CUDA-graph layout:
shapes fixed, counts on the device)."""

from __future__ import annotations

import torch

from r1kernels import _alloc, backend
from r1kernels._checks import check_tensor
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


def validate(a, a_scales, b, b_scales, masked_m, out_dtype) -> None:
    read = read_operands(a, a_scales, b, b_scales, out_dtype, 3, 3)
    if read is not None:  # the rest of the rules on what it read: the usual case costs one pass
        a_shape, b_shape, a_strides, b_strides = read
        G = a_shape[0]
        if (ids_ok(masked_m, G, a) and a_scales.shape[0] == G and b_shape[0] == G and b_scales.shape[0] == G
                and a_strides[0] % 16 == 0 and b_strides[0] % 16 == 0):  # fmt: skip
            return
    check_tensor("a", a, dtypes=(E4M3,), ndim=3)
    check_tensor("a_scales", a_scales, dtypes=(F32,), ndim=3)
    check_tensor("b", b, dtypes=(E4M3,), ndim=3)
    check_tensor("b_scales", b_scales, dtypes=(F32,), ndim=3)
    check_tensor("masked_m", masked_m, dtypes=(I32,), ndim=1, contiguous=True)
    G = a.shape[0]
    for name, t in (("a_scales", a_scales), ("b", b), ("b_scales", b_scales), ("masked_m", masked_m)):
        if t.shape[0] != G:
            raise ValueError(f"{name} must have one entry per group (G = a.shape[0] = {G}), got {tuple(t.shape)}")
    if masked_m.is_cpu != a.is_cpu or (not a.is_cpu and masked_m.device != a.device):
        raise ValueError(f"masked_m must be on a's device {a.device}, got {masked_m.device}")
    validate_matrices(a, a_scales, b, b_scales, out_dtype)  # each group's operands (and devices): the dense rules
    for name, t in (("a", a), ("b", b)):
        if t.stride(0) % 16:
            raise ValueError(f"{name}'s group stride must be a multiple of 16 elements, got strides {t.stride()}")


def _check_counts(masked_m: torch.Tensor, M: int) -> None:
    ok = ((masked_m >= 0) & (masked_m <= M)).all()
    if masked_m.device.type != "cpu":
        torch._assert_async(ok, "masked_m must lie in [0, M]")
    elif not bool(ok):
        raise ValueError(f"masked_m must lie in [0, M] = [0, {M}], got {masked_m.tolist()[:8]}")


def _cpu(a, a_scales, b, b_scales, masked_m, out) -> None:
    M = a.shape[1]
    if M <= CPU_SMALL_ROWS:  # decode-sized groups: every group in one call, which checks the counts first
        if not cpu_gemm_small(a, a_scales, b, b_scales, out, masked_m=masked_m):
            _check_counts(masked_m, M)  # a count is out of range: raises, naming them
        return
    _check_counts(masked_m, M)
    out.zero_()
    for g, m in enumerate(masked_m.tolist()):
        cpu_gemm(a[g, :m], a_scales[g, :m], b[g], b_scales[g], out[g, :m])


def _fake(a, a_scales, b, b_scales, masked_m, out_dtype):
    validate(a, a_scales, b, b_scales, masked_m, out_dtype)
    return a.new_empty((a.shape[0], a.shape[1], b.shape[1]), dtype=out_dtype)


def _samples(device: str):
    from r1kernels.fp8.quantize_per_block import quantize_per_block
    from r1kernels.fp8.quantize_per_token_group import quantize_per_token_group

    groups = [quantize_per_token_group(torch.randn(80, 144, device=device)) for _ in range(3)]
    weights = [quantize_per_block(torch.randn(130, 144, device=device)) for _ in range(3)]
    a, sa = torch.stack([x for x, _ in groups]), torch.stack([s for _, s in groups])
    b, sb = torch.stack([w for w, _ in weights]), torch.stack([s for _, s in weights])
    masked_m = torch.tensor([80, 0, 33], dtype=torch.int32, device=device)
    yield Sample((a, sa, b, sb, masked_m, torch.bfloat16), ("test_faketensor", "test_aot_dispatch_dynamic"))


@define_op("fp8_grouped_gemm_nt_masked", fake=_fake, samples=_samples)
def _masked_op(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    masked_m: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    validate(a, a_scales, b, b_scales, masked_m, out_dtype)
    G, M, _ = a.shape
    out = _alloc.empty((G, M, b.shape[1]), out_dtype, a.device)
    if out.numel() == 0:
        return out
    if backend.on_cpu(a, "fp8_grouped_gemm_nt_masked"):
        _cpu(a, a_scales, b, b_scales, masked_m, out)  # checks the counts
    else:
        _check_counts(masked_m, M)
        launch_gemm(a, a_scales, b, b_scales, out, None, masked_m=masked_m)
    return out


def grouped_gemm_nt_masked(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    masked_m: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``out[g, r] = (a[g, r] * a_scales[g, r]) @ (b[g] * b_scales[g]).T`` for ``r < masked_m[g]``, else 0.

    Args:
        a: ``[G, M, K] float8_e4m3fn`` (M rows reserved per group), a_scales ``[G, M, ceil(K/128)] float32``.
        b: ``[G, N, K] float8_e4m3fn``, b_scales ``[G, ceil(N/128), ceil(K/128)] float32``.
        masked_m: ``[G] int32`` rows in use per group, each in ``[0, M]`` (checked on the device for CUDA
            tensors: no host synchronisation, so the call can be captured in a CUDA graph).
        out_dtype: bfloat16 or float32.

    Returns ``[G, M, N]``. One launch over (group, row tile, N tile); tiles past a group's rows skip their K loop.
    """
    return _masked_op(a, a_scales, b, b_scales, masked_m, out_dtype)
