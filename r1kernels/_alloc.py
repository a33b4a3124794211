"""Output allocation for launchers. Tests switch on poisoning so every output starts as NaN (0xFF bytes
for FP8 and integers): a kernel that forgets to write an element cannot pass by luck of zeroed memory."""

from __future__ import annotations

import torch

_poison = False


def set_poison(enabled: bool) -> None:
    global _poison
    _poison = enabled


def _maybe_poison(t: torch.Tensor) -> torch.Tensor:
    if _poison and t.numel():
        if t.dtype.is_floating_point and t.element_size() > 1:
            t.fill_(float("nan"))
        elif t.is_contiguous():
            t.view(torch.uint8).fill_(0xFF)  # FP8 NaN, integer -1
        else:
            t.fill_(-1)
    return t


def poison(*tensors: torch.Tensor) -> None:
    """Poison outputs allocated with torch.empty directly (decode-sized paths, where this call's one flag read
    replaces one per output) when tests ask for it."""
    if _poison:
        for t in tensors:
            _maybe_poison(t)


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # sizes unpacked: torch.empty parses them ~0.5 us faster than one tuple, a visible share of a decode-sized call
    t = torch.empty(*shape, dtype=dtype, device=device) if shape else torch.empty((), dtype=dtype, device=device)
    return _maybe_poison(t) if _poison else t


def empty_strided(shape, strides, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _maybe_poison(torch.empty_strided(shape, strides, dtype=dtype, device=device))
