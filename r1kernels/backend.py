"""Where an op runs.

- ``auto`` (default): CUDA tensors run the Triton kernels; CPU tensors run the CPU path (C++ where it
  exists, otherwise memory-frugal PyTorch).
- ``triton``: the Triton kernels, also on CPU tensors through Triton's interpreter. That needs
  ``TRITON_INTERPRET=1`` in the environment before ``triton`` is first imported; tests set it.
- ``cpu``: the CPU path (CPU tensors only).
- ``cuda``: the CUDA C++ kernels where an op has one (CUDA tensors only), otherwise Triton.

Choose with the ``R1K_BACKEND`` environment variable or, scoped, with ``use_backend("triton")``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import torch

from r1kernels import _env

BACKENDS = ("auto", "triton", "cpu", "cuda")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("r1k_backend", default=None)


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_read_env = _env.reader("R1K_BACKEND")


def requested_backend() -> str:
    override = _override.get()
    if override is not None:
        return override
    value = _read_env()
    return "auto" if value is None else _check_name(value)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops called inside the block on backend ``name`` (one of ``BACKENDS``)."""
    token = _override.set(_check_name(name))
    try:
        yield
    finally:
        _override.reset(token)


def device_arch(device: torch.device) -> int | None:
    """Compute capability as an int (90 for sm_90) of a CUDA device; None for CPU tensors (interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


H100_SMS = 132


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, for grid sizing; CPU tensors (Triton's interpreter) take
    an H100's 132, so the tests exercise the choices an H100 makes."""
    if device.type != "cuda":
        return H100_SMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_cpu(t: torch.Tensor, op: str) -> bool:
    """``resolve(t.device, op) == "cpu"``, answered from flags in the usual case (a CPU tensor, no backend
    requested): the device object and the string compare cost a decode-sized op ~0.4 us."""
    if t.is_cpu and _override.get() is None and _read_env() is None:
        return True
    return resolve(t.device, op) == "cpu"


def resolve(device: torch.device, op: str, has_cuda_kernel: bool = False) -> str:
    """The backend that ``op`` uses for tensors on ``device``: 'triton', 'cpu' or 'cuda'."""
    want = requested_backend()
    if want == "auto":  # the usual case, first: no further checks to make
        kind = device.type
        if kind == "cpu":
            return "cpu"
        if kind == "cuda":
            return "triton"
    if device.type == "cuda":
        if want == "cpu":
            raise RuntimeError(f"{op}: backend 'cpu' was requested but the inputs are CUDA tensors")
        return "cuda" if want == "cuda" and has_cuda_kernel else "triton"
    if device.type != "cpu":
        raise RuntimeError(f"{op}: inputs must be CPU or CUDA tensors, got device {device}")
    if want == "cuda":
        raise RuntimeError(f"{op}: backend 'cuda' was requested but the inputs are CPU tensors")
    if want == "triton":
        if not interpreter_enabled():
            raise RuntimeError(
                f"{op}: backend 'triton' on CPU tensors runs Triton's interpreter, which needs "
                "TRITON_INTERPRET=1 set in the environment before triton is imported"
            )
        from r1kernels import _interpreter_shim

        _interpreter_shim.install()
        return "triton"
    return "cpu"
