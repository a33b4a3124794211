"""Fused transpose-and-quantize for the FP8 weight gradient: x [T, C] -> x.T in E4M3 with one scale per 128
tokens (128 x 1 tiles along the token dimension), optionally with x's own 1 x 128 quantization from the same
read (a linear layer's input needs both: row-wise for the forward GEMM, transposed for the weight gradient)."""

from __future__ import annotations

import torch

from r1kernels import _alloc, backend
from r1kernels._checks import cdiv, check_tensor
from r1kernels._ext import cpp_dtype, ext
from r1kernels._launch import launch
from r1kernels._ops import Sample, define_op
from r1kernels.fp8.kernels import quantize_transposed as kernel
from r1kernels.fp8.kernels.e4m3 import hw_fp8_convert
from r1kernels.fp8.tiles import INPUT_DTYPES, cached_geometry, quantize_outputs, tile_geometry

_OP = "quantize_fp8_transposed"
TILE = kernel.TILE
TOKEN_ALIGN = 16  # x.T's rows are padded to 16 tokens: 16-byte rows, the GEMMs' K alignment


def padded_tokens(t: int) -> int:
    return cdiv(t, TOKEN_ALIGN) * TOKEN_ALIGN


def validate(x: torch.Tensor, m_indices: torch.Tensor | None) -> None:
    check_tensor("x", x, dtypes=INPUT_DTYPES, ndim=2)
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"x must have unit stride in its last dimension (got strides {x.stride()}); "
                         "call .contiguous() first")  # fmt: skip
    if m_indices is not None:
        check_tensor("m_indices", m_indices, dtypes=(torch.int32,), ndim=1, contiguous=True)
        if m_indices.shape[0] != x.shape[0] or m_indices.device != x.device:
            raise ValueError(f"m_indices must hold one id per row of x ({x.shape[0]}) on {x.device}, got "
                             f"{tuple(m_indices.shape)} on {m_indices.device}")  # fmt: skip


def _outputs(x: torch.Tensor, rowwise: bool):
    T, C = x.shape
    qt = _alloc.empty((C, padded_tokens(T)), torch.float8_e4m3fn, x.device)
    st = _alloc.empty((C, cdiv(T, TILE)), torch.float32, x.device)
    if rowwise:
        return *quantize_outputs(x, 1, TILE, False), qt, st
    # the op always returns four tensors; without the row-wise pair they are empty
    return torch.empty((0, 0), dtype=qt.dtype, device=x.device), torch.empty((0, 0), device=x.device), qt, st


def _cpu(x, m_indices, rowwise):
    """Both quantizations in C++ straight from x (padding rows read as zeros), no transposed copy."""
    q, s, qt, st = outputs = _outputs(x, rowwise)
    T, C = x.shape
    ids = 0 if m_indices is None else m_indices.data_ptr()
    ext().quantize_fp8_transposed_cpu(x=x.data_ptr(), dtype=cpp_dtype(x.dtype), geometry=cached_geometry(T, C,
                                      x.stride(0) if T > 1 else C, TILE, 1, 1, st.stride(0)), m_indices=ids,
                                      out=qt.data_ptr(), out_stride=qt.shape[1], scales=st.data_ptr())  # fmt: skip
    if rowwise:
        ext().quantize_fp8_tiles_cpu(x=x.data_ptr(), dtype=cpp_dtype(x.dtype), geometry=tile_geometry(x, 1, TILE, s),
                                     out=q.data_ptr(), scales=s.data_ptr(), pow2=False, m_indices=ids)  # fmt: skip
    return outputs


def _fake(x, rowwise, m_indices):
    validate(x, m_indices)
    return _outputs(x, rowwise)


def _samples(device: str):
    x = torch.randn(200, 144, device=device).to(torch.bfloat16)
    ids = torch.tensor([0] * 150 + [-1] * 50, dtype=torch.int32, device=device)
    yield Sample((x, True, None))
    yield Sample((x[:37], False, ids[:37]))


@define_op(_OP, fake=_fake, samples=_samples)
def _quantize_transposed_op(
    x: torch.Tensor, rowwise: bool, m_indices: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    validate(x, m_indices)
    T, C = x.shape
    if T and C and backend.on_cpu(x, _OP):
        return _cpu(x, m_indices, rowwise)
    outputs = _outputs(x, rowwise)
    if T == 0 or C == 0:
        outputs[2].view(torch.uint8).zero_()
        return outputs
    q, s, qt, st = outputs
    hw = hw_fp8_convert(backend.device_arch(x.device))
    cfg = kernel.config()
    grid = (cdiv(T, cfg["TILE_T"]), cdiv(C, cfg["TILE_C"]))
    codes = (q, qt) if hw else (q.view(torch.uint8), qt.view(torch.uint8))
    args = (x, codes[1], st, codes[0], s, qt if m_indices is None else m_indices, T, C, qt.shape[1],
            x.stride(0) if T > 1 else C, s.stride(0), s.stride(1))  # fmt: skip
    launch(kernel.quantize_transposed_kernel, grid, args, cfg, x.device, ROWWISE=rowwise,
           HAS_IDS=m_indices is not None, POW2=False, HW_CVT=hw)  # fmt: skip
    return outputs


def quantize_transposed(x: torch.Tensor, *, m_indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x.T`` to FP8 E4M3 with one scale per 128 tokens of each column: the weight-gradient GEMM's
    operand layout (DeepSeek-V3's 1 x 128 activation tiles taken along the token dimension).

    Args:
        x: ``[T, C]`` bfloat16 / float16 / float32 (tokens x features), unit stride in the last dimension.
        m_indices: optional ``[T] int32``; rows with a negative id (MoE padding rows) are treated as zeros,
            whatever they hold, so padding never reaches a scale or a weight-gradient sum.

    Returns:
        ``(xt_fp8 [C, T_pad] float8_e4m3fn row-major, xt_scales [C, ceil(T / 128)] float32 row-major)`` with
        ``T_pad = T`` rounded up to 16; columns ``T..T_pad`` of ``xt_fp8`` are zero codes (a GEMM over tokens
        can take ``K = T_pad``). ``x.T ~= xt_fp8[:, :T].float() * xt_scales`` broadcast over each 128 tokens.
        Non-finite inputs behave as in ``quantize_per_token_group``, per 128-token group.
    """
    _, _, qt, st = _quantize_transposed_op(x, False, m_indices)
    return qt, st


def quantize_rowwise_and_transposed(
    x: torch.Tensor, *, m_indices: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_per_token_group(x, 128)`` and ``quantize_transposed(x)`` from one read of ``x``.

    Returns ``(x_fp8 [T, C], x_scales [T, ceil(C/128)] row-major, xt_fp8 [C, T_pad], xt_scales [C, ceil(T/128)])``;
    the row-wise pair is byte-identical to ``quantize_per_token_group``'s (with padding rows zeroed when
    ``m_indices`` is given).
    """
    return _quantize_transposed_op(x, True, m_indices)
