"""Launchers of the row-movement kernels, shared by ``moe_permute`` and ``moe_unpermute`` (each one's backward is
the other's forward kernel): pick the backend, allocate, launch. CPU tensors take the C++ twins
(``csrc/moe/rows_cpu.cpp``: fp32 sums in slot order, so the CPU results are deterministic too)."""

from __future__ import annotations

import functools

import torch

from r1kernels import _alloc, backend
from r1kernels._checks import cdiv
from r1kernels._ext import cpp_dtype, ext
from r1kernels._launch import launch
from r1kernels.moe.kernels import rows as kernels


def _codes(t: torch.Tensor) -> torch.Tensor:
    """FP8 codes travel as bytes (the kernels move them, never compute on them)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@functools.lru_cache(maxsize=256)
def _problem(rows: int, tokens: int, top_k: int, hidden: int, row_stride: int):
    return ext().RowsProblem(rows=rows, tokens=tokens, top_k=top_k, hidden=hidden, row_stride=row_stride)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def gather_rows(x: torch.Tensor, slots: torch.Tensor, top_k: int, weights: torch.Tensor | None, op: str):
    """out [R, H]: row r = x[slots[r] // top_k] (times weights.view(-1)[slots[r]]), zero where slots[r] < 0."""
    R, H = slots.shape[0], x.shape[1]
    out = _alloc.empty((R, H), x.dtype, x.device)
    if out.numel() == 0:
        return out
    if backend.on_cpu(x, op):
        # unweighted rows are copied as bytes (FP8 codes, float32 scales): dtype is then not read
        dtype = cpp_dtype(x.dtype) if weights is not None else ext().DType.float32
        ext().gather_rows_cpu(x=x.data_ptr(), slots=slots.data_ptr(), weights=_ptr(weights), out=out.data_ptr(),
                              problem=_problem(R, 0, top_k, H, x.stride(0)), dtype=dtype,
                              elem_bytes=x.element_size())  # fmt: skip
        return out
    cfg = kernels.config(H)
    grid = (cdiv(R, cfg["BLOCK_R"]), cdiv(H, cfg["BLOCK_H"]))
    args = (_codes(x), slots, weights if weights is not None else slots, _codes(out), R, H, top_k, x.stride(0),
            out.stride(0))  # fmt: skip
    launch(kernels.gather_rows_kernel, grid, args, cfg, x.device, HAS_WEIGHT=weights is not None)
    return out


def combine_rows(y: torch.Tensor, row_of: torch.Tensor, weights: torch.Tensor | None, op: str):
    """out [T, H]: token t = sum_j weights[t, j] * y[row_of[t, j]] over routed slots, fp32 sums in slot order."""
    (T, k), H = row_of.shape, y.shape[1]
    out = _alloc.empty((T, H), y.dtype, y.device)
    if out.numel() == 0:
        return out
    if backend.on_cpu(y, op):
        ext().combine_rows_cpu(y=y.data_ptr(), row_of=row_of.data_ptr(), weights=_ptr(weights), out=out.data_ptr(),
                               problem=_problem(0, T, k, H, y.stride(0)), dtype=cpp_dtype(y.dtype))  # fmt: skip
        return out
    cfg = kernels.combine_config(H)
    grid = (cdiv(T, cfg["BLOCK_T"]), cdiv(H, cfg["BLOCK_H"]))
    args = (y, row_of, weights if weights is not None else row_of, out, T, H, k, y.stride(0), out.stride(0))
    launch(kernels.combine_rows_kernel, grid, args, cfg, y.device, HAS_WEIGHT=weights is not None)
    return out


def row_dot(d: torch.Tensor, y: torch.Tensor, row_of: torch.Tensor, op: str) -> torch.Tensor:
    """[T, k] fp32: <d[t], y[row_of[t, j]]>, 0 for unrouted slots."""
    (T, k), H = row_of.shape, d.shape[1]
    out = _alloc.empty((T, k), torch.float32, d.device)
    if out.numel() == 0:
        return out
    if H == 0 or y.shape[0] == 0:
        return out.zero_()
    if backend.on_cpu(d, op):
        ext().row_dot_cpu(d=d.data_ptr(), d_dtype=cpp_dtype(d.dtype), y=y.data_ptr(), y_dtype=cpp_dtype(y.dtype),
                          row_of=row_of.data_ptr(), out=out.data_ptr(),
                          problem=_problem(0, T, k, H, y.stride(0)))  # fmt: skip
        return out
    cfg = kernels.row_dot_config()
    launch(kernels.row_dot_kernel, (cdiv(T, cfg["BLOCK_T"]),), (d, y, row_of, out, T, H, k, d.stride(0), y.stride(0)),
           cfg, d.device)  # fmt: skip
    return out
