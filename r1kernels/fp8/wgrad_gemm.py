"""FP8 weight-gradient GEMM: dW [N, K] = dY.T @ X with both operands quantized 1 x 128 along the token
dimension (the 128 x 1 tiles of DeepSeek-V3's recipe), fp32 out. The operands come from
``quantize_transposed`` as dY.T [N, T] and X.T [K, T], so the product is an NT GEMM over tokens."""

from __future__ import annotations

import torch

from r1kernels import _alloc, backend
from r1kernels._ops import Sample, define_op
from r1kernels.fp8.gemm_nt import cpu_gemm, launch_gemm, validate

_OP = "fp8_wgrad_gemm"


def _fake(a, a_scales, b, b_scales, c):
    validate(a, a_scales, b, b_scales, torch.float32, c, b_tile_rows=1)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.float32)


def _samples(device: str):
    from r1kernels.fp8.quantize_transposed import quantize_transposed

    a, sa = quantize_transposed(torch.randn(150, 70, device=device))
    b, sb = quantize_transposed(torch.randn(150, 144, device=device))
    checks = ("test_faketensor", "test_aot_dispatch_dynamic")
    yield Sample((a, sa, b, sb, None), checks)
    yield Sample((a, sa, b, sb, torch.randn(70, 144, device=device)), checks)


@define_op(_OP, fake=_fake, samples=_samples)
def _wgrad_op(
    a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, c: torch.Tensor | None
) -> torch.Tensor:
    validate(a, a_scales, b, b_scales, torch.float32, c, b_tile_rows=1)
    out = _alloc.empty((a.shape[0], b.shape[0]), torch.float32, a.device)
    if out.numel() == 0 or a.shape[1] == 0:
        return out.zero_() if c is None else out.copy_(c)
    if backend.on_cpu(a, _OP):
        cpu_gemm(a, a_scales, b, b_scales, out, c, b_tile_rows=1)
    else:
        launch_gemm(a, a_scales, b, b_scales, out, c, b_row_scales=True)
    return out


def wgrad_gemm(
    a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor, *, c: torch.Tensor | None = None
) -> torch.Tensor:
    """``dW [N, K] = (a * a_scales) @ (b * b_scales).T (+ c)`` in fp32, a linear layer's weight gradient.

    Args:
        a: ``dY.T`` as ``quantize_transposed(dy)`` gives it: ``[N, T_pad] float8_e4m3fn`` (T_pad a multiple of
            16), with ``a_scales [N, ceil(T_pad/128)] float32``, one per 128 tokens of each output feature.
        b: ``X.T`` the same way: ``[K, T_pad] float8_e4m3fn`` with ``b_scales [K, ceil(T_pad/128)] float32``.
        c: optional ``[N, K]`` float32 / bfloat16 added to the product (gradient accumulation; not modified).

    Returns ``[N, K] float32``. Each 128-token block's product is formed in fp32 and scaled into an fp32 sum
    (the same promotion as ``gemm_nt``); GPU: FP8 tensor cores on sm_89 / sm_90a, fp16 MMA on the decoded
    codes on sm_80; CPU: as ``gemm_nt`` (AMX tiles where the CPU has them, else dequantize + fp32 matmul).
    """
    return _wgrad_op(a, a_scales, b, b_scales, c)
