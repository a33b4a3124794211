"""What every launcher shares: the kernel configuration object and the device guard.

- ``KernelConfig``: the tile sizes (constexpr), warps and pipeline stages of one kernel. A launcher gets it
  from a named pure function of (shape, dtype, arch) and the compile registry builds its variants from the
  same functions, so the configurations compiled in the check are the ones that launch.
- ``device_guard`` / ``launch`` / ``cuda_stream``: kernels run on their inputs' device and that device's
  current stream, never on whichever device happens to be current. Triton launches on the current device's
  current stream, so making the inputs' device current is enough for it; CUDA C++ kernels get the stream
  handle explicitly. CPU tensors (Triton's interpreter, C++ CPU kernels) never touch ``torch.cuda``.

Every launch in the package goes through ``launch`` (a test checks there is no other ``kernel[grid](...)``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes (constexpr arguments), warps and software-pipeline stages of one kernel launch."""

    tiles: Mapping[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3

    def __getitem__(self, name: str) -> int:
        return self.tiles[name]

    def launch_options(self) -> dict[str, Any]:
        return {**self.tiles, "num_warps": self.num_warps, "num_stages": self.num_stages}

    @classmethod
    def from_triton(cls, config: Any) -> KernelConfig:
        """From a ``triton.Config`` (an autotune list entry)."""
        return cls(dict(config.kwargs), config.num_warps, config.num_stages)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device for the block (a no-op, with no CUDA call, for CPU tensors)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def cuda_stream(device: torch.device) -> int:
    """The raw ``cudaStream_t`` of ``device``'s current stream, for the CUDA C++ kernels."""
    return torch.cuda.current_stream(device).cuda_stream


def _descriptor_memory(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # kernels that build TMA descriptors in-kernel (tl.make_tensor_descriptor) get their global scratch here,
    # on the current device, which the device guard has made the inputs' one
    return torch.empty(size, dtype=torch.int8, device="cuda")


@functools.cache
def _ensure_descriptor_allocator() -> None:
    import triton

    triton.set_allocator(_descriptor_memory)


# Test hook: called with (kernel, config, switches) before every launch (the registry-coverage test records
# what the ops really launch).
on_launch: Callable[[Any, KernelConfig, dict[str, Any]], None] | None = None


def launch(kernel: Any, grid: tuple[int, ...], args: tuple, config: KernelConfig, device: torch.device,
           **switches: Any) -> None:  # fmt: skip
    """``kernel[grid](*args, <tiles>, <switches>)`` on ``device`` and its current stream; ``switches`` are the
    feature constexprs (dtypes, flags) that are not tile sizes."""
    if on_launch is not None:
        on_launch(kernel, config, switches)
    if switches.get("USE_TMA"):
        _ensure_descriptor_allocator()
    with device_guard(device):
        kernel[grid](*args, **switches, **config.launch_options())
