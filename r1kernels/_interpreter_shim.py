"""Fixes for two defects of Triton's CPU interpreter (``TRITON_INTERPRET=1``) that our kernels hit.

1. ``tl.dot`` on bfloat16 operands: the interpreter stores bf16 as raw uint16 and hands those bits
   to ``np.matmul``, which multiplies them as integers. We upcast bf16 (and fp8) operands to fp32 first,
   which is what the tensor cores compute (exact products, fp32 accumulation).
2. Float <-> FP8 casts: the interpreter's bit-twiddling conversion rounds ties away from even, drops
   carries, flushes subnormals and decodes the e4m3fn NaN pattern as 480. We convert through torch,
   which is exact round-to-nearest-even, and saturate finite values to the format's maximum as the
   GPU's ``cvt.rn.satfinite`` does.
3. float32 -> bfloat16 casts truncate instead of rounding to nearest even (``cvt.rn.bf16.f32`` on the
   GPU). We round through torch.

Only the interpreter is touched; compiled GPU kernels are unaffected. ``install()`` is idempotent.
"""

from __future__ import annotations

import numpy as np
import torch

_FP8_TORCH = {"fp8e4nv": torch.float8_e4m3fn, "fp8e5": torch.float8_e5m2}
_FP8_MAX = {"fp8e4nv": 448.0, "fp8e5": 57344.0}
_saved: dict[str, object] = {}


def _as_torch(data: np.ndarray, tl_dtype) -> torch.Tensor:
    name = tl_dtype.name
    if name == "bf16":
        return torch.from_numpy(np.ascontiguousarray(data).view(np.int16)).view(torch.bfloat16)
    if name in _FP8_TORCH:
        return torch.from_numpy(np.ascontiguousarray(data).view(np.uint8)).view(_FP8_TORCH[name])
    return torch.from_numpy(np.ascontiguousarray(data))


def _to_fp32(handle) -> np.ndarray:
    return _as_torch(handle.data, handle.dtype.scalar).to(torch.float32).numpy()


def _needs_fix(tl_dtype) -> bool:
    return tl_dtype.name == "bf16" or tl_dtype.name in _FP8_TORCH


def install() -> None:
    """Patch the interpreter's dot and FP8 casts (no-op when already installed)."""
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    if "create_dot" in _saved:
        return
    for name in ("create_dot", "create_fp_to_fp", "cast_impl"):
        _saved[name] = getattr(builder_cls, name)
    original_dot = builder_cls.create_dot
    original_fp_to_fp = builder_cls.create_fp_to_fp
    original_cast = builder_cls.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not (_needs_fix(a.dtype.scalar) or _needs_fix(b.dtype.scalar)):
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = np.matmul(_to_fp32(a), _to_fp32(b)).astype(d.data.dtype) + d.data
        return interpreter.TensorHandle(out, d.dtype.scalar)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        src_name, dst_name = src.dtype.scalar.name, dst_type.scalar.name
        if src_name not in _FP8_TORCH and dst_name not in _FP8_TORCH:
            return original_fp_to_fp(self, src, dst_type, rounding_mode)
        value = _as_torch(src.data, src.dtype.scalar)
        if dst_name in _FP8_TORCH:
            limit = _FP8_MAX[dst_name]
            value = value.float()
            value = torch.where(value.isnan(), value, value.clamp(-limit, limit))
            out = value.to(_FP8_TORCH[dst_name]).view(torch.uint8).numpy()
        else:
            target = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dst_name]
            out = value.to(target)
            out = out.view(torch.int16).numpy().view(np.uint16) if dst_name == "bf16" else out.numpy()
        return interpreter.TensorHandle(out, dst_type.scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar.name == "fp32" and dst_type.scalar.name == "bf16":
            out = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
            return interpreter.TensorHandle(out.numpy().view(np.uint16), dst_type.scalar)
        return original_cast(self, src, dst_type)

    builder_cls.create_dot = create_dot
    builder_cls.cast_impl = cast_impl
    builder_cls.create_fp_to_fp = create_fp_to_fp


def uninstall() -> None:
    """Restore the interpreter's own behaviour (used by the test that shows the defects)."""
    from triton.runtime import interpreter

    for name, fn in _saved.items():
        setattr(interpreter.InterpreterBuilder, name, fn)
    _saved.clear()


def installed() -> bool:
    return "create_dot" in _saved
