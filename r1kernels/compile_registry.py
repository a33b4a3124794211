"""Registry of the Triton kernels and the exact configurations they are launched with.

Each kernel module registers a function ``variants(arch) -> list[KernelVariant]`` built from the same
config functions its launcher uses, so the ahead-of-time compile check (``r1kernels.compile_report``)
covers what users actually run. Nothing here needs a GPU.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Modules that hold registered Triton kernels; importing them fills the registry.
KERNEL_MODULES = ("r1kernels.fp8.kernels", "r1kernels.grpo.kernels")

ARCHS = (80, 89, 90)
ARCH_NAMES = {80: "sm_80", 89: "sm_89", 90: "sm_90a"}
# Largest dynamic shared memory per block (bytes) on A100, L4/L40/RTX 4090, H100.
SHARED_LIMIT = {80: 166912, 89: 101376, 90: 232448}


@dataclass(frozen=True)
class KernelVariant:
    name: str
    kernel: Any  # triton.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    # Integer / pointer arguments that launches see divisible by 16 (enables 16-byte accesses).
    aligned: tuple[str, ...] = ()
    # Matrix kernels must use warpgroup MMA on sm_90a; memory-bound ones should issue 16-byte accesses.
    kind: str = "memory"  # "memory" | "matrix"
    notes: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, Callable[[int], list[KernelVariant]]] = {}


def register(family: str) -> Callable[[Callable[[int], list[KernelVariant]]], Callable[[int], list[KernelVariant]]]:
    def wrap(fn: Callable[[int], list[KernelVariant]]) -> Callable[[int], list[KernelVariant]]:
        _REGISTRY[f"{family}:{fn.__name__}"] = fn
        return fn

    return wrap


def all_variants(arch: int) -> list[KernelVariant]:
    for module in KERNEL_MODULES:
        importlib.import_module(module)
    out: list[KernelVariant] = []
    for fn in _REGISTRY.values():
        out.extend(fn(arch))
    return out
