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


def _gather_rows_cpu(x, slots, top_k, weights, out) -> None:
    """One index_select into ``out`` (the CPU layout has padding rows only where slots are unrouted)."""
    all_valid = bool((slots >= 0).all())
    src = slots.long() if all_valid else slots.clamp_min(0).long()
    torch.index_select(_codes(x), 0, src // top_k, out=_codes(out))
    if weights is not None:
        w = weights.reshape(-1).index_select(0, src)
        out.copy_(out.float().mul_(w[:, None]) if out.dtype != torch.float32 else out.mul_(w[:, None]))
    if not all_valid:
        _codes(out)[slots < 0] = 0


def _combine_rows_cpu(y, row_of, weights) -> torch.Tensor:
    """[T, H] fp32: each token's k rows gathered at once, then a batched [1, k] x [k, H] product (deterministic
    on the CPU); an unrouted slot's weight is 0 and its row is never gathered from a real slot."""
    T, k = row_of.shape
    routed = row_of >= 0
    if not bool(routed.any()):  # nothing routed here (y may have no rows at all)
        return torch.zeros(T, y.shape[1])
    w = routed.float() if weights is None else torch.where(routed, weights, 0.0)
    rows = y.index_select(0, row_of.clamp_min(0).view(-1).long()).view(T, k, -1)
    if not bool(routed.all()):
        rows = torch.where(routed[:, :, None], rows, torch.zeros((), dtype=rows.dtype))
    return torch.bmm(w.view(T, 1, k), rows.float() if rows.dtype != torch.float32 else rows).view(T, -1)


def gather_rows(x: torch.Tensor, slots: torch.Tensor, top_k: int, weights: torch.Tensor | None, op: str):
    """out [R, H]: row r = x[slots[r] // top_k] (times weights.view(-1)[slots[r]]), zero where slots[r] < 0."""
    R, H = slots.shape[0], x.shape[1]
    out = _alloc.empty((R, H), x.dtype, x.device)
    if out.numel() == 0:
        return out
    if backend.resolve(x.device, op) == "cpu":
        _gather_rows_cpu(x, slots, top_k, weights, out)
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
    if backend.resolve(y.device, op) == "cpu":
        return out.copy_(_combine_rows_cpu(y, row_of, weights))
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
    if backend.resolve(d.device, op) == "cpu":
        rows = y.index_select(0, row_of.clamp_min(0).view(-1).long()).view(T, k, H).float()
        dots = torch.einsum("th,tkh->tk", d.float(), rows)
        return out.copy_(torch.where(row_of >= 0, dots, 0.0))
    cfg = kernels.row_dot_config()
    launch(kernels.row_dot_kernel, (cdiv(T, cfg["BLOCK_T"]),), (d, y, row_of, out, T, H, k, d.stride(0), y.stride(0)),
           cfg, d.device)  # fmt: skip
    return out
