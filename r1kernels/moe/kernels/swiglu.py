"""SwiGLU over the gate_up projection's output: act = silu(h[:, :I]) * h[:, I:] and its backward, each one pass
(the backward writes both halves of dh, so no concatenation)."""

from __future__ import annotations

import triton
import triton.language as tl

from r1kernels._launch import KernelConfig
from r1kernels.compile_registry import register, variant


@triton.jit
def swiglu_kernel(
    h_ptr,  # [R, 2I]: gate columns [0, I), up columns [I, 2I); row stride 2I
    d_ptr,  # BACKWARD: [R, I] the gradient of act
    out_ptr,  # forward: act [R, I]; BACKWARD: dh [R, 2I]
    R, I,
    BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows[:, None] < R) & (cols[None, :] < I)
    gate_at = h_ptr + rows[:, None] * (2 * I) + cols[None, :]
    g = tl.load(gate_at, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_at + I, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    if BACKWARD:
        d = tl.load(d_ptr + rows[:, None] * I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dg = d * u * sig * (1.0 + g * (1.0 - sig))
        out_at = out_ptr + rows[:, None] * (2 * I) + cols[None, :]
        tl.store(out_at, dg.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_at + I, (d * silu).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + rows[:, None] * I + cols[None, :], (silu * u).to(out_ptr.dtype.element_ty), mask=mask)


def config() -> KernelConfig:
    return KernelConfig({"BLOCK_R": 8, "BLOCK_I": 512}, num_warps=4)


@register
def variants(arch: int):
    return [
        variant(f"moe.swiglu[{dtype}{',backward' if backward else ''}]", swiglu_kernel, config(),
                types={"h_ptr": f"*{dtype}", "d_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"},
                switches={"BACKWARD": backward}, aligned=("h_ptr", "d_ptr", "out_ptr", "I"))
        for dtype in ("bf16", "fp32") for backward in (False, True)
    ]  # fmt: skip
