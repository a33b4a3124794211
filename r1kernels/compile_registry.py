"""Registry of the Triton kernels and the exact configurations they are launched with.

Kernels live in per-op modules under ``r1kernels/<family>/kernels/``. Each such module registers functions
``variants(arch) -> list[KernelVariant]`` (decorated with ``@register``) built from the same config functions
its launcher calls, so the ahead-of-time compile check (``r1kernels.compile_report``) covers what users
actually run. The registry finds those modules by walking the package: a new family or kernel module needs
no list to be edited. Nothing here needs a GPU.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from r1kernels._launch import KernelConfig

ARCHS = (80, 89, 90)
ARCH_NAMES = {80: "sm_80", 89: "sm_89", 90: "sm_90a"}
# Largest dynamic shared memory per block (bytes) on A100, L4/L40/RTX 4090, H100.
SHARED_LIMIT = {80: 166912, 89: 101376, 90: 232448}
KINDS = ("memory", "matrix", "fma")


@dataclass(frozen=True)
class KernelVariant:
    name: str
    kernel: Any  # triton.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, Any]
    config: KernelConfig
    # Integer / pointer arguments that launches see divisible by 16 (enables 16-byte accesses).
    aligned: tuple[str, ...] = ()
    # "matrix": must use warpgroup MMA on sm_90a; "fma": a matrix kernel that by request computes on the FMA
    # units (full-fp32 dots, no tensor-core check); "memory": memory-bound, should issue 16-byte accesses.
    kind: str = "memory"
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def num_warps(self) -> int:
        return self.config.num_warps

    @property
    def num_stages(self) -> int:
        return self.config.num_stages


def variant(
    name: str,
    kernel: Any,
    config: KernelConfig,
    *,
    types: Mapping[str, str],
    switches: Mapping[str, Any] | None = None,
    unit: tuple[str, ...] = (),
    aligned: tuple[str, ...] = (),
    kind: str = "memory",
) -> KernelVariant:
    """A variant whose signature is derived from the kernel's own parameters: constexpr parameters take their
    values from ``config`` (tile sizes) and ``switches`` (feature flags), pointer and float arguments take
    their Triton type from ``types``, the remaining integers are ``i32``. ``unit`` names integer arguments
    that launches pass as 1 (Triton specialises those to a constexpr 1, e.g. a unit stride)."""
    switches = dict(switches or {})
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    for p in inspect.signature(kernel.fn).parameters.values():
        if "constexpr" in str(p.annotation):  # Triton's own test (the annotation may be a string)
            if p.name in config.tiles:
                constexprs[p.name] = config.tiles[p.name]
            elif p.name in switches:
                constexprs[p.name] = switches.pop(p.name)
            else:
                raise ValueError(f"{name}: constexpr {p.name} is neither a tile of the config nor a switch")
            signature[p.name] = "constexpr"
        elif p.name in unit:
            signature[p.name], constexprs[p.name] = "constexpr", 1
        elif p.name in types:
            signature[p.name] = types[p.name]
        elif p.name.endswith("_ptr"):
            raise ValueError(f"{name}: pointer {p.name} needs a type in `types`")
        else:
            signature[p.name] = "i32"
    unknown = set(switches) | (set(types) - set(signature)) | (set(aligned) - set(signature))
    if unknown:
        raise ValueError(f"{name}: {sorted(unknown)} are not parameters of {kernel.fn.__name__}")
    return KernelVariant(name, kernel, signature, constexprs, config, aligned, kind)


def autotune_configs(kernel: Any) -> list[KernelConfig]:
    """Every entry of a ``triton.autotune`` list, so a registry function can enumerate them all."""
    return [KernelConfig.from_triton(c) for c in kernel.configs]


_REGISTRY: dict[str, Callable[[int], list[KernelVariant]]] = {}


def register(fn: Callable[[int], list[KernelVariant]]) -> Callable[[int], list[KernelVariant]]:
    """Decorator for a kernel module's ``variants(arch)`` function."""
    _REGISTRY[f"{fn.__module__}:{fn.__name__}"] = fn
    return fn


def is_kernel_module(name: str) -> bool:
    """Kernel modules are the modules of a ``kernels`` package inside a family: r1kernels.<family>.kernels.*"""
    parts = name.split(".")
    return len(parts) >= 4 and parts[2] == "kernels"


@functools.cache
def kernel_modules() -> tuple[str, ...]:
    """Import every kernel module of the package (which registers its variants) and return their names."""
    import r1kernels

    found = []
    for info in pkgutil.walk_packages(r1kernels.__path__, "r1kernels."):
        if is_kernel_module(info.name) and not info.ispkg:
            importlib.import_module(info.name)
            found.append(info.name)
    return tuple(found)


def all_variants(arch: int) -> list[KernelVariant]:
    kernel_modules()
    out: list[KernelVariant] = []
    for fn in _REGISTRY.values():
        out.extend(fn(arch))
    return out
