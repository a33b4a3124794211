"""Whole-model validation while training: the same batch through the kernel path and the reference path
(``r1kernels.reference_mode``: MLA attention, MoE routing and experts, and the GRPO loss in float64), the loss
and every parameter's gradient compared, the worst relative error kept per op family; past tolerance the run
stops with a message that names the family and the parameter."""

from __future__ import annotations

from collections.abc import Callable

import torch

from r1kernels.reference_mode import reference_ops

FAMILIES = (("moe", (".mlp.experts.", ".mlp.gate.")), ("mla", (".self_attn.",)), ("grpo / lm_head", ("lm_head",)))


def family_of(name: str) -> str:
    for family, marks in FAMILIES:
        if any(m in name for m in marks):
            return family
    return "dense / norms / embeddings"


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative error with a 1e-4 floor on the reference's norm (a near-zero gradient is all round-off)."""
    return float((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-4))


class KernelMismatch(RuntimeError):
    pass


def _output_checks(model: torch.nn.Module, worst: dict, where: dict):
    """Forward hooks on the MLA and MoE blocks: each kernel-path output is compared with the same block run on
    the same input through the reference path, so an error is pinned on the block where it starts (gradient
    errors spread to every layer below)."""
    from r1kernels.mla import MLA
    from r1kernels.moe import MoE

    busy = []

    def hook(name, family):
        def check(module, inputs, output):
            if busy:  # the reference re-run below
                return
            busy.append(1)
            try:
                with torch.no_grad(), reference_ops():
                    expected = module(*inputs)
            finally:
                busy.pop()
            err = _rel(output.detach(), expected)
            if err > worst.get(family, -1.0):
                worst[family], where[family] = err, f"output of {name}"

        return check

    return [m.register_forward_hook(hook(n, "mla" if isinstance(m, MLA) else "moe"))
            for n, m in model.named_modules() if isinstance(m, (MLA, MoE))]  # fmt: skip


def validate_step(model: torch.nn.Module, loss_fn: Callable[[bool], torch.Tensor], tol: float = 1e-3,
                  grad_tol: float | None = 1e-3):  # fmt: skip
    """Run ``loss_fn(reference)`` both ways and compare: every MLA / MoE block's output against the reference
    on the same input, then the loss and every parameter's gradient. Leaves the kernel path's gradients in
    ``.grad`` (the caller steps on them) and returns ``(kernel loss, {family: worst relative error})``.
    ``tol`` bounds the block outputs; ``grad_tol`` the loss and the gradients (None: logged, not enforced)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    with reference_ops():
        ref_loss = loss_fn(True)
    ref_loss.backward()
    ref_grads = {n: p.grad.detach().clone() if p.grad is not None else None for n, p in params}
    model.zero_grad(set_to_none=True)
    outputs, output_where = {}, {}
    hooks = _output_checks(model, outputs, output_where)
    try:
        loss = loss_fn(False)
    finally:
        for h in hooks:
            h.remove()
    for family, err in sorted(outputs.items(), key=lambda kv: -kv[1]):  # the block where the error starts
        if not err <= tol:
            raise KernelMismatch(f"kernel path differs from the reference in op family '{family}' "
                                 f"({output_where[family]}): relative error {err:.3e} > {tol:g}")  # fmt: skip
    loss.backward()
    worst = {"loss": abs(float(loss.detach()) - float(ref_loss.detach())) / max(1.0, abs(float(ref_loss.detach())))}
    where = {"loss": "the loss"}
    for name, p in params:
        got, want = p.grad, ref_grads[name]
        if want is None and got is None:
            continue
        err = _rel(
            got if got is not None else torch.zeros_like(want), want if want is not None else torch.zeros_like(got)
        )
        family = family_of(name)
        if err > worst.get(family, -1.0):
            worst[family], where[family] = err, name
    for family, err in worst.items():
        if grad_tol is not None and not err <= grad_tol:  # NaN fails too
            raise KernelMismatch(f"kernel path differs from the reference in op family '{family}' ({where[family]}): "
                                 f"relative error {err:.3e} > {grad_tol:g}")  # fmt: skip
    for family, err in outputs.items():
        worst[f"{family} outputs"] = err
    return loss, worst
