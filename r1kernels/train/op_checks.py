"""Per-op gradient checks for whole-model validation: each kernel op (every ``FP8Linear``, every routed-experts
block, every MLA attention core) is re-run through its reference on the very input the kernel path gave it and
backpropagated from the very output gradient the kernel path received; its output, input gradients and weight
gradients are compared with the kernel path's.

Why beside the end-to-end gradients: in bf16 and FP8 two paths that are both right still drift apart between
the loss and a deep layer (a bf16 last-bit difference upstream flips an e4m3 rounding downstream, and a flip
moves a value by up to 1/16), so the end-to-end check can only hold a few-percent bar there. On the same
input and output gradient an op's reference (``r1kernels.fp8.reference.fp8_linear``, the experts' reference on
the same tiles) differs from its kernels only in accumulation order, so this check holds a bar that a 1% error
in any one of an op's three products (output, input gradient, weight gradient) crosses in every precision."""

from __future__ import annotations

import torch
from torch import nn

from r1kernels.reference_mode import reference_ops, use_reference


def _checked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from r1kernels.fp8.linear import FP8Linear
    from r1kernels.mla.layer import AttentionCore
    from r1kernels.moe.layer import RoutedExperts

    kinds = (FP8Linear, RoutedExperts, AttentionCore)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in float64; 0 when both are 0, inf when only ``want`` is (no floor: both
    sides come from the same operands, so a tiny gradient is compared as exactly as a large one)."""
    diff, norm = float((got.double() - want.double()).norm()), float(want.double().norm())
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm


KINDS = {
    "op": "operands as given (FP8 linears, the experts without FP8, the attention core's output)",
    "fp8 experts": "the FP8 experts quantize the SwiGLU activations they compute themselves: last bits that follow "
    "the accumulation order now and then land on the other side of an e4m3 rounding, a 1/16 move of one value",
    "attention gradient": "the attention core's gradients: in 16 bits the kernel's FlashAttention arithmetic "
    "(rowsum(dO * O) from the stored 16-bit O, probabilities rounded for the products) adds a few roundings",
}


def _kind(module: nn.Module) -> str:
    from r1kernels.mla.layer import AttentionCore
    from r1kernels.moe.layer import RoutedExperts

    if isinstance(module, AttentionCore):
        return "attention"
    return "fp8 experts" if isinstance(module, RoutedExperts) and module.fp8 else "op"


class _Call:
    __slots__ = ("args", "input_grads", "output", "output_grad")

    def __init__(self, args):
        self.args, self.input_grads, self.output, self.output_grad = args, {}, None, None


class OpRecorder:
    """Records, while installed, each checked op's kernel-path call: inputs (each differentiable one through an
    alias of its own, so that its gradient hook sees this op's share alone when the tensor feeds several ops),
    output and output gradient. Calls made under ``reference_ops()`` or without grad are not recorded."""

    def __init__(self, model: nn.Module):
        self.modules = _checked_modules(model)
        self.calls: dict[str, list[_Call]] = {}
        self._handles = []
        for name, module in self.modules:
            self._handles.append(module.register_forward_pre_hook(self._before(name)))
            self._handles.append(module.register_forward_hook(self._after(name)))

    def _before(self, name):
        def hook(module, args):
            if use_reference() or not torch.is_grad_enabled():
                return None
            aliased = tuple(a.view_as(a) if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args)
            call = _Call(aliased)
            for i, a in enumerate(aliased):
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    a.register_hook(lambda g, i=i, call=call: call.input_grads.__setitem__(i, g))
            self.calls.setdefault(name, []).append(call)
            return aliased

        return hook

    def _after(self, name):
        def hook(module, args, output):
            calls = self.calls.get(name)
            if not calls or calls[-1].args is not args or not output.requires_grad:
                return
            call = calls[-1]
            call.output = output.detach()
            output.register_hook(lambda g: setattr(call, "output_grad", g))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def compare(self) -> list[tuple[float, str, str, str]]:
        """After the kernel path's backward: ``(relative error, op name, what, kind)`` for every recorded op's
        output, input gradients and (when the op ran once, so that ``.grad`` is its alone) weight gradients.
        ``kind`` picks the bar (``KINDS``)."""
        found = []
        for name, module in self.modules:
            kind = _kind(module)
            grad_kind = "attention gradient" if kind == "attention" else kind
            out_kind = "op" if kind == "attention" else kind
            calls = self.calls.get(name, [])
            for call in calls:
                if call.output is None or call.output_grad is None:  # not on the loss's path
                    continue
                args = tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                             for a in call.args)  # fmt: skip
                inputs = [(i, a) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
                params = [(n, p) for n, p in module.named_parameters() if p.requires_grad] if len(calls) == 1 else []
                with torch.enable_grad(), reference_ops():
                    out = module(*args)
                    grads = torch.autograd.grad(out, [a for _, a in inputs] + [p for _, p in params],
                                                call.output_grad.to(out.dtype), allow_unused=True)  # fmt: skip
                found.append((relative_error(call.output, out.detach()), name, "output", out_kind))
                for (i, a), g in zip(inputs, grads[: len(inputs)], strict=True):
                    got = call.input_grads.get(i)
                    got = torch.zeros_like(a) if got is None else got
                    found.append((relative_error(got, torch.zeros_like(a) if g is None else g), name,
                                  f"gradient of input {i}", grad_kind))  # fmt: skip
                for (pname, p), g in zip(params, grads[len(inputs) :], strict=True):
                    got = torch.zeros_like(p) if p.grad is None else p.grad
                    found.append((relative_error(got, torch.zeros_like(p) if g is None else g), name,
                                  f"gradient of {pname}", grad_kind))  # fmt: skip
        return found
