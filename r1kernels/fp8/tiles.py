"""Launchers for tile-wise FP8 quantization / dequantization: validate, allocate, pick the backend,
launch. The public ops in quantize_per_token_group.py, quantize_per_block.py and dequantize.py call
these; the fake (meta) kernels call the same ``*_outputs`` allocators so shapes and strides agree."""

from __future__ import annotations

import functools

import torch

from r1kernels import _alloc, backend
from r1kernels._checks import cdiv, check_power_of_two, check_tensor
from r1kernels._ext import cpp_dtype, ext, has_cuda_kernels
from r1kernels._launch import cuda_stream, device_guard, launch
from r1kernels.fp8.kernels import dequantize_tiles as dequantize_kernel
from r1kernels.fp8.kernels import quantize_tiles as quantize_kernel
from r1kernels.fp8.kernels.e4m3 import hw_fp8_convert

INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEQUANT_OUT_DTYPES = (torch.bfloat16, torch.float32)
SCALE_LAYOUTS = ("row", "m_major")


def tma_aligned_rows(m: int) -> int:
    """Rows padded so each column of an M-major fp32 scale tensor starts 16-byte aligned (DeepGEMM's
    ``get_tma_aligned_size(m, 4)``)."""
    return cdiv(m, 4) * 4


def validate_quantize_input(name: str, x: torch.Tensor, tile: int, tile_arg: str, max_tile: int = 1024) -> None:
    check_tensor(name, x, dtypes=INPUT_DTYPES, ndim=2)
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(
            f"{name} must have unit stride in its last dimension (got strides {x.stride()}); call .contiguous() first"
        )
    check_power_of_two(tile_arg, tile, minimum=16, maximum=max_tile)


def tile_geometry(x: torch.Tensor, tile_m: int, tile_k: int, scales: torch.Tensor):
    """The C++ kernels' TileGeometry of a [M, K] matrix (unit column stride) and its scales."""
    M, K = x.shape
    return cached_geometry(M, K, x.stride(0) if M > 1 else K, tile_m, tile_k, scales.stride(0), scales.stride(1))


@functools.lru_cache(maxsize=1024)
def cached_geometry(rows, cols, row_stride, tile_rows, tile_cols, scale_stride_r, scale_stride_c):
    # cached: building the pybind11 struct costs a few microseconds, a visible share of a decode-sized call
    return ext().TileGeometry(rows=rows, cols=cols, row_stride=row_stride, tile_rows=tile_rows, tile_cols=tile_cols,
                              scale_stride_r=scale_stride_r, scale_stride_c=scale_stride_c)  # fmt: skip


def quantize_outputs(x: torch.Tensor, tile_m: int, tile_k: int, m_major: bool):
    """Empty (q, scales) for x [M, K]: q dense row-major e4m3, scales [ceil(M/tile_m), ceil(K/tile_k)] fp32,
    row-major or M-major (column-major with TMA-aligned column stride)."""
    M, K = x.shape
    sm, sk = cdiv(M, tile_m), cdiv(K, tile_k)
    q = _alloc.empty((M, K), torch.float8_e4m3fn, x.device)
    if m_major:
        scales = _alloc.empty_strided((sm, sk), (1, tma_aligned_rows(sm)), torch.float32, x.device)
    else:
        scales = _alloc.empty((sm, sk), torch.float32, x.device)
    return q, scales


def quantize_tiles(x: torch.Tensor, tile_m: int, tile_k: int, ue8m0: bool, m_major: bool, op: str):
    q, scales = quantize_outputs(x, tile_m, tile_k, m_major)
    M, K = x.shape
    if M == 0 or K == 0:
        return q, scales
    where = backend.resolve(x.device, op, has_cuda_kernel=tile_m == 1 and has_cuda_kernels())
    row_stride = x.stride(0) if M > 1 else K
    if where == "cpu":
        ext().quantize_fp8_tiles_cpu(x=x.data_ptr(), dtype=cpp_dtype(x.dtype), geometry=tile_geometry(x, tile_m, tile_k,
                                     scales), out=q.data_ptr(), scales=scales.data_ptr(), pow2=ue8m0)  # fmt: skip
    elif where == "cuda":
        with device_guard(x.device):
            ext().quantize_fp8_groups_cuda(x=x.data_ptr(), dtype=cpp_dtype(x.dtype), geometry=tile_geometry(x, 1,
                                           tile_k, scales), out=q.data_ptr(), scales=scales.data_ptr(), pow2=ue8m0,
                                           stream=cuda_stream(x.device))  # fmt: skip
    else:
        cfg = quantize_kernel.config(tile_m, tile_k)
        hw = hw_fp8_convert(backend.device_arch(x.device))
        grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(K, tile_k))
        args = (x, q if hw else q.view(torch.uint8), scales, M, K, row_stride, scales.stride(0), scales.stride(1))
        launch(quantize_kernel.quantize_tiles_kernel, grid, args, cfg, x.device,
               TILE_K=tile_k, ROWS_SHARE_SCALE=tile_m > 1, POW2=ue8m0, HW_CVT=hw)  # fmt: skip
    return q, scales


def validate_dequantize_input(
    q: torch.Tensor, scales: torch.Tensor, tile_m: int, tile_k: int, tile_arg: str, out_dtype: torch.dtype
) -> None:
    check_tensor("x_fp8", q, dtypes=(torch.float8_e4m3fn,), ndim=2, contiguous=True)
    check_tensor("scales", scales, dtypes=(torch.float32,), ndim=2)
    check_power_of_two(tile_arg, tile_k, minimum=16, maximum=1024)
    expected = (cdiv(q.shape[0], tile_m), cdiv(q.shape[1], tile_k))
    if tuple(scales.shape) != expected:
        raise ValueError(
            f"scales must have shape {expected} for x_fp8 of shape {tuple(q.shape)} and "
            f"{tile_arg}={tile_k}, got {tuple(scales.shape)}"
        )
    if scales.device != q.device:
        raise ValueError(f"scales must be on x_fp8's device {q.device}, got {scales.device}")
    if out_dtype not in DEQUANT_OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {[str(d) for d in DEQUANT_OUT_DTYPES]}, got {out_dtype}")


def dequantize_tiles(
    q: torch.Tensor, scales: torch.Tensor, tile_m: int, tile_k: int, out_dtype: torch.dtype, op: str
) -> torch.Tensor:
    M, K = q.shape
    out = _alloc.empty((M, K), out_dtype, q.device)
    if M == 0 or K == 0:
        return out
    where = backend.resolve(q.device, op)
    if where == "cpu":
        ext().dequantize_fp8_tiles_cpu(q=q.data_ptr(), scales=scales.data_ptr(), geometry=tile_geometry(q, tile_m,
                                       tile_k, scales), out=out.data_ptr(), out_dtype=cpp_dtype(out_dtype))  # fmt: skip
    else:
        cfg = dequantize_kernel.config(tile_k)
        hw = hw_fp8_convert(backend.device_arch(q.device))
        grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(K, cfg["BLOCK_K"]))
        args = (q if hw else q.view(torch.uint8), scales, out, M, K, scales.stride(0), scales.stride(1))
        launch(dequantize_kernel.dequantize_tiles_kernel, grid, args, cfg, q.device,
               TILE_M=tile_m, TILE_K=tile_k, HW_CVT=hw)  # fmt: skip
    return out
