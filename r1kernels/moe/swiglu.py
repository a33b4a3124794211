"""SwiGLU of the experts' gate_up output (HF's ``act_fn(gate) * up`` with gate the first half), one pass each
way, with autograd."""

from __future__ import annotations

import torch

from r1kernels import _alloc, backend
from r1kernels._checks import cdiv, check_tensor
from r1kernels._launch import launch
from r1kernels._ops import Sample, define_op
from r1kernels.moe.kernels import swiglu as kernel

_OP = "moe_swiglu"


def _validate(h) -> None:
    check_tensor("h", h, dtypes=(torch.bfloat16, torch.float16, torch.float32), ndim=2, contiguous=True)
    if h.shape[1] % 2:
        raise ValueError(f"h must be [R, 2I] (gate then up), got an odd width {h.shape[1]}")


def _run(h, d=None):
    R, I = h.shape[0], h.shape[1] // 2
    out = _alloc.empty((R, 2 * I) if d is not None else (R, I), h.dtype, h.device)
    if out.numel() == 0:
        return out
    if backend.on_cpu(h, _OP):
        hf = h.float()  # no copy for fp32
        g, u = hf[:, :I], hf[:, I:]
        if d is None:
            return out.copy_(torch.nn.functional.silu(g).mul_(u))
        sig = torch.sigmoid(g)
        silu = g * sig
        d = d.float()
        out[:, I:] = d * silu
        out[:, :I] = (d * u).mul_(sig).mul_(silu.neg_().add_(g).add_(1))  # silu' = sig * (1 + g - silu)
        return out
    cfg = kernel.config()
    grid = (cdiv(R, cfg["BLOCK_R"]), cdiv(I, cfg["BLOCK_I"]))
    launch(kernel.swiglu_kernel, grid, (h, h if d is None else d, out, R, I), cfg, h.device, BACKWARD=d is not None)
    return out


def _fake(h):
    _validate(h)
    return h.new_empty((h.shape[0], h.shape[1] // 2))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (h,) = ctx.saved_tensors
    return _run(h, grad.contiguous().to(h.dtype))


def _samples(device: str):
    yield Sample((torch.randn(37, 2 * 300, device=device),))


@define_op(_OP, fake=_fake, backward=_backward, setup_context=_setup_context, samples=_samples)
def _swiglu_op(h: torch.Tensor) -> torch.Tensor:
    _validate(h)
    return _run(h)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``silu(h[:, :I]) * h[:, I:]`` for ``h [R, 2I]`` (bfloat16 / float16 / float32, contiguous), computed in
    fp32 and returned in h's dtype ``[R, I]``. Differentiable; the backward writes ``dh [R, 2I]`` in one pass."""
    return _swiglu_op(h)
