"""Launchers of the row-movement kernels, shared by ``moe_permute`` and ``moe_unpermute`` (each one's backward is
the other's forward kernel): pick the backend, allocate, launch. CPU tensors take the same gathers in torch
ops (fp32 sums in slot order, so the CPU results are deterministic too)."""

from __future__ import annotations

import torch

from r1kernels import _alloc, backend
from r1kernels._checks import cdiv
from r1kernels._launch import launch
from r1kernels.moe.kernels import rows as kernels


def _codes(t: torch.Tensor) -> torch.Tensor:
    """FP8 codes travel as bytes (the kernels move them, never compute on them)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def gather_rows(x: torch.Tensor, slots: torch.Tensor, top_k: int, weights: torch.Tensor | None, op: str):
    """out [R, H]: row r = x[slots[r] // top_k] (times weights.view(-1)[slots[r]]), zero where slots[r] < 0."""
    R, H = slots.shape[0], x.shape[1]
    out = _alloc.empty((R, H), x.dtype, x.device)
    if out.numel() == 0:
        return out
    if backend.resolve(x.device, op) == "cpu":
        valid = slots >= 0
        v = x.index_select(0, torch.where(valid, slots // top_k, 0).long())
        if weights is not None:
            v = (v.float() * torch.where(valid, weights.view(-1)[slots.clamp_min(0).long()], 0.0)[:, None]).to(x.dtype)
        return out.copy_(torch.where(valid[:, None], v, torch.zeros((), dtype=x.dtype)))
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
    if backend.resolve(y.device, op) == "cpu":
        acc = torch.zeros(T, H, dtype=torch.float32)
        for j in range(k):
            r = row_of[:, j]
            valid = r >= 0
            v = y.index_select(0, r.clamp_min(0).long()).float()
            w = valid.float() if weights is None else torch.where(valid, weights[:, j], 0.0)
            acc += torch.where(valid[:, None], v * w[:, None], 0.0)
        return out.copy_(acc)
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
    if H == 0:
        return out.zero_()
    if backend.resolve(d.device, op) == "cpu":
        rows = y.index_select(0, row_of.clamp_min(0).view(-1).long()).view(T, k, H).float()
        dots = torch.einsum("th,tkh->tk", d.float(), rows)
        return out.copy_(torch.where(row_of >= 0, dots, 0.0))
    cfg = kernels.row_dot_config()
    launch(kernels.row_dot_kernel, (cdiv(T, cfg["BLOCK_T"]),), (d, y, row_of, out, T, H, k, d.stride(0), y.stride(0)),
           cfg, d.device)  # fmt: skip
    return out
