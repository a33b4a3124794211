"""Access to the compiled extension r1kernels._C, with a plain-words error when it is missing."""

from __future__ import annotations

import functools
from types import ModuleType

import torch


@functools.cache
def ext() -> ModuleType:
    try:
        from r1kernels import _C
    except ImportError as err:
        raise ImportError(
            "r1kernels._C (the C++ kernels) is not built. Install the package with "
            "`pip install -e .` from the repository root (needs cmake, ninja, pybind11 and a C++17 "
            f"compiler; nvcc optional). Original error: {err}"
        ) from err
    return _C


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA sources (nvcc was found at build time)."""
    try:
        return bool(ext().with_cuda)
    except ImportError:
        return False


@functools.cache
def cpp_dtype(dtype: torch.dtype):
    """The extension's ``DType`` member for a torch dtype (float32, float16, bfloat16)."""
    member = ext().DType.__members__.get(str(dtype).removeprefix("torch."))
    if member is None:
        raise TypeError(f"the C++ kernels take float32, float16 or bfloat16 tensors, got {dtype}")
    return member
