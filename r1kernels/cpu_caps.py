"""What this CPU does fast, decided at run time, never assumed from the machine the code was written on.

bf16 GEMMs are fast only with native bf16 dot products (x86: AMX-BF16 or AVX512-BF16; Arm: the BF16
extension): oneDNN then multiplies bf16 directly. Without them PyTorch emulates bf16 GEMMs and they run
5-30x slower than fp32 (seen: the GRPO CPU backward at N=512, H=1024, V=32000 took 47 s with bf16 GEMMs on
an AVX2-only EPYC and 1.5 s with fp32 ones). ``R1K_CPU_BF16_GEMM=1|0`` overrides the detection.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

_NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 flags; "bf16" is Arm's Features entry


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags, so the safe fp32 choice
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _override() -> bool | None:
    value = os.environ.get("R1K_CPU_BF16_GEMM")
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"R1K_CPU_BF16_GEMM must be 0 or 1, got {value!r}")
    return value == "1"


def fast_bf16_gemm() -> bool:
    """True when bf16 GEMMs should run in bf16 on this CPU (native bf16 dot products, or forced)."""
    forced = _override()
    if forced is not None:
        return forced
    return any(f in _cpu_flags() for f in _NATIVE_BF16_FLAGS)


def bf16_gemm_path() -> str:
    """Which GEMM dtype the CPU paths use for bf16 inputs, and why (for benchmark tables)."""
    forced = _override()
    native = sorted(f for f in _NATIVE_BF16_FLAGS if f in _cpu_flags())
    why = "forced by R1K_CPU_BF16_GEMM" if forced is not None else (", ".join(native) or "no native bf16")
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{'bf16' if fast_bf16_gemm() else 'fp32'} GEMMs for bf16 inputs ({why}; torch kernels: {isa})"
