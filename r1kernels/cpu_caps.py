"""What this CPU does fast, decided where the code runs, never assumed from the machine it was written on.

bf16 GEMMs (``fast_bf16_gemm``). PyTorch multiplies bf16 matrices on the CPU fast only through oneDNN on a CPU
with native bf16 dot products: x86 AVX512-BF16 or AMX-BF16, Arm's BF16 extension. Anywhere else it falls back
to a generic kernel that converts element by element, 30-60x slower than an fp32 GEMM (seen: the GRPO CPU
forward + backward at N=512, H=1024, V=32000 took 47 s with bf16 GEMMs on an AVX2-only EPYC and 1.5 s with fp32 ones;
on an AVX512-BF16 EPYC one 512x2048x1024 bf16 GEMM takes 16 ms through oneDNN and 3.2 s with oneDNN switched
off). Where bf16 is native it is the faster one, but by less (that GEMM: 3x; the whole GRPO forward +
backward above, whose logits GEMMs are fp32 either way: 1.1-1.3x), so the rule is "bf16 only when native":

- the CPU has native bf16 dot products: ``torch.cpu.get_capabilities()`` (the cpuinfo library PyTorch
  dispatches on; any OS) where this torch has it, else the flags of ``/proc/cpuinfo``, else none;
- this torch sends bf16 GEMMs to oneDNN on this CPU (``torch.ops.mkldnn._is_mkldnn_bf16_supported``: built
  with oneDNN, and the CPU passes PyTorch's own check);
- oneDNN is switched on now (``torch.backends.mkldnn.enabled``, which a user may turn off at run time).

``torch.backends.cpu.get_cpu_capability()`` alone cannot decide: it names the vector width PyTorch's own
kernels were dispatched for ("AVX2", "AVX512"), not bf16 support (Zen 3, Skylake-X and Ice Lake are "AVX2" or
"AVX512" without native bf16); it is reported in the description only. A timing probe was not used: on a
loaded or shared machine a few milliseconds of timing are noise, so the choice would change from run to run
and results with it, and the gap it would have to find (30x or more) is exactly what the flags predict.

``R1K_CPU_BF16_GEMM=1`` or ``0`` forces the choice either way (read on every call, so tests may set it).

bf16 GEMMs with fp32 results (``amx_bf16``). PyTorch's CPU matmul rounds a bf16 product to bf16, so results
that must stay fp32 (the LM-head logits) were GEMMs on fp32 copies. Where this process can run AMX-BF16 tiles
(the CPU has them and Linux granted the tile permission: asked by the C++ extension itself, so the answer is
the one that holds when the kernel runs), ``csrc/common/amx_bf16_gemm.cpp`` computes them from the bf16 values
(exact products, fp32 sums). ``R1K_CPU_AMX=0`` switches it off (the fp32-copy path), for tests and comparisons.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from r1kernels import _env

ENV = "R1K_CPU_BF16_GEMM"
AMX_ENV = "R1K_CPU_AMX"
# Native bf16 dot products: x86 AVX512-BF16 and AMX-BF16; Arm's BF16 extension (BFDOT / BFMMLA), named "bf16"
# both by torch.cpu.get_capabilities and in the Features line of /proc/cpuinfo.
NATIVE_BF16 = ("amx_bf16", "avx512_bf16", "bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature names (lower case), from PyTorch's cpuinfo where available, else /proc/cpuinfo."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # recent torch only
    if get_capabilities is not None:
        return frozenset(name for name, value in get_capabilities().items() if value is True)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # neither: no flags, the safe fp32 choice
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86, Arm
            return frozenset(line.split(":", 1)[1].lower().split())
    return frozenset()


@functools.cache
def _onednn_bf16_built() -> bool:
    """This torch has oneDNN and routes bf16 GEMMs to it on this CPU (fixed for the process)."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an op this torch does not register
        return False


def _override() -> bool | None:
    value = os.environ.get(ENV, "").strip()
    if value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 1 (bf16 GEMMs) or 0 (fp32 GEMMs) or unset (detect), got {value!r}")
    return value == "1"


def _detect() -> tuple[bool, str]:
    """(bf16 GEMMs are fast here, the reason in a few words)."""
    native = [flag for flag in NATIVE_BF16 if flag in cpu_flags()]
    if not native:
        return False, "no native bf16"
    if not _onednn_bf16_built():
        return False, f"{native[0]}, but this torch has no oneDNN bf16 GEMM"
    if not torch.backends.mkldnn.enabled:
        return False, f"{native[0]}, but oneDNN is switched off"
    return True, native[0]


def fast_bf16_gemm() -> bool:
    """True when GEMMs on bf16 inputs should run in bf16 on this CPU, False when upcast to fp32 (faster there).
    ``R1K_CPU_BF16_GEMM=1|0`` forces it; any other value raises ``ValueError``."""
    forced = _override()
    return _detect()[0] if forced is None else forced


_read_amx_env = _env.reader(AMX_ENV)  # on every call: each CPU GEMM asks


@functools.cache
def _amx_usable() -> bool:
    from r1kernels._ext import ext  # the extension asks the OS for the tile permission on first use

    return bool(ext().amx_bf16_usable())


def amx_bf16() -> bool:
    """True when bf16 GEMMs with fp32 results run on AMX tiles here; ``R1K_CPU_AMX=0`` switches them off."""
    value = _read_amx_env()
    if value is None:  # the usual case, first
        return _amx_usable()
    value = value.strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{AMX_ENV} must be 0 (off) or 1 / unset (use AMX where usable), got {value!r}")
    return value != "0" and _amx_usable()


def bf16_gemm_path() -> str:
    """The choice and its reason, for benchmark tables: e.g. "bf16 GEMMs (avx512_bf16; torch kernels: AVX512)",
    "fp32 GEMMs (no native bf16; torch kernels: AVX2)", "fp32 GEMMs (forced by R1K_CPU_BF16_GEMM=0; ...)"."""
    forced = _override()
    fast, why = _detect() if forced is None else (forced, f"forced by {ENV}={int(forced)}")
    amx = "; fp32-output bf16 GEMMs on AMX" if amx_bf16() else ""
    return (f"{'bf16' if fast else 'fp32'} GEMMs ({why}; torch kernels: {torch.backends.cpu.get_cpu_capability()})"
            f"{amx}")  # fmt: skip
