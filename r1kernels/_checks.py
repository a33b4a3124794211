"""Input validation shared by the launchers: every error names the argument and what was expected,
and is raised before anything is allocated or launched."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    ndim: int | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major); call .contiguous() first")
    return t


def check_power_of_two(name: str, value: int, *, minimum: int = 1, maximum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or value & (value - 1) or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be a power of two >= {minimum}{upper}, got {value}")
    return value


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    first = next(iter(tensors.values())).device
    for t in tensors.values():
        if t.device != first:
            listing = ", ".join(f"{n} on {x.device}" for n, x in tensors.items())
            raise ValueError(f"all inputs must be on one device; got {listing}")
    return first


def same_device(first: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether all are on ``first``'s device, read cheaply for the fast paths of validation (which then name what
    is wrong with ``check_same_device`` or their own messages)."""
    if first.is_cpu:  # a flag read; comparing torch.device objects costs ~0.3 us a pair
        for t in others:  # noqa: SIM110 (a loop, not all() over a generator: half the cost)
            if not t.is_cpu:
                return False
        return True
    device = first.device
    return all(t.device == device for t in others)


def check_index_range(name: str, index: torch.Tensor, upper: int, upper_name: str) -> None:
    """Indices outside [0, upper) would read out of bounds. On the CPU a host check raises a clear error; on a
    GPU the check runs on the device (``torch._assert_async``): no host synchronisation, so the op stays
    capturable in a CUDA graph, and a bad index still stops the program instead of reading garbage."""
    if not index.numel():
        return
    if index.device.type != "cpu":
        torch._assert_async(((index >= 0) & (index < upper)).all(), f"{name} must lie in [0, {upper_name})")
        return
    lo, hi = (int(t) for t in torch.aminmax(index))
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must lie in [0, {upper_name}) = [0, {upper}), got values in [{lo}, {hi}]")


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
