"""Whole-model validation while training: the same batch through the kernel path and the reference path
(``r1kernels.reference_mode``: MLA attention, MoE routing and experts, FP8 linears on the same e4m3 tiles, and
the GRPO loss in float64); each block's output, each kernel op's output and gradients on the same input and
output gradient, the loss and every parameter's gradient compared, the worst relative error kept per op
family; past tolerance the run stops with a message that names the family and the op or parameter."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from r1kernels.reference_mode import reference_ops, use_reference
from r1kernels.train.op_checks import OpRecorder

FAMILIES = (("moe", (".mlp.experts.", ".mlp.gate.", ".mlp.shared_experts.")), ("mla", (".self_attn.",)),
            ("grpo / lm_head", ("lm_head",)))  # fmt: skip


def family_of(name: str) -> str:
    for family, marks in FAMILIES:
        if any(m in name for m in marks):
            return family
    return "dense / norms / embeddings"


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative error of a block output, with a 1e-4 floor on the reference's norm."""
    return float((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-4))


LOGGED_AS = {"op": "ops", "attention gradient": "attention gradients", "fp8 experts": "fp8 experts"}


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


class PinnedRoutes:
    """Routing held fixed between the kernel and the reference pass. While recording (from construction to
    ``remove()``, or the ``with`` block) forward hooks on the model's routers keep each kernel-path call's
    expert ids; inside ``pinned()`` under ``reference_ops()`` the routers take them back call by call, with
    their own routing weights for those experts. Routing is a discrete choice: a near-tie that a last-bit
    difference upstream breaks the other way moves a token to another expert, and one such token outweighs
    every rounding error of a bf16 batch. Whether a router chooses right is checked exactly on its block's own
    input (``_output_checks``); end to end the choice is held fixed."""

    def __init__(self, model: torch.nn.Module):
        from r1kernels.moe.layer import TopkRouter

        self.routers = [m for m in model.modules() if isinstance(m, TopkRouter)]
        self.recorded: dict[int, list[torch.Tensor]] = {}
        self.replay: dict[int, list[torch.Tensor]] | None = None
        self._handles = [m.register_forward_hook(self._hook) for m in self.routers]

    def _hook(self, module, inputs, output):
        from r1kernels.moe import reference

        logits, _, ids = output
        if not use_reference():
            if self.replay is None:
                self.recorded.setdefault(id(module), []).append(ids)
            return None
        if self.replay is None or not self.replay.get(id(module)):
            return None  # a block's own reference re-run chooses for itself
        pinned = self.replay[id(module)].pop(0)
        weights, _ = reference.route(logits, module.e_score_correction_bias, top_k=module.top_k,
                                     n_group=module.n_group, topk_group=module.topk_group,
                                     routed_scaling_factor=module.routed_scaling_factor,
                                     norm_topk_prob=module.norm_topk_prob, ids=pinned)  # fmt: skip
        return logits, weights, pinned.to(ids.dtype)

    def __enter__(self) -> PinnedRoutes:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextlib.contextmanager
    def pinned(self):
        """Under ``reference_ops()`` inside this block the routers replay the recorded choices (the hooks are
        put back for the block if recording has ended)."""
        handles = [] if self._handles else [m.register_forward_hook(self._hook) for m in self.routers]
        self.replay = {k: list(v) for k, v in self.recorded.items()}
        try:
            yield
        finally:
            self.replay = None
            for h in handles:
                h.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def validate_step(model: torch.nn.Module, loss_fn: Callable[[bool], torch.Tensor], tol: float = 1e-3,
                  grad_tol: float | None = 1e-3, grad_floor: float = 1e-4, op_tol: float | None = None,
                  attention_grad_tol: float | None = None, fp8_experts_tol: float | None = None):  # fmt: skip
    """Run ``loss_fn(reference)`` both ways and compare: every MLA / MoE block's output against the reference
    on the same input, every kernel op against its reference on the same input and output gradient, then the
    loss and every parameter's gradient end to end. Leaves the kernel path's gradients in ``.grad`` (the caller
    steps on them) and returns ``(kernel loss, {family: relative error})``.

    - ``"<family> outputs"``: the worst block output, bounded by ``tol``; checked first, so a wrong block is
      named where its error starts.
    - ``"<family> ops"``: each kernel op (``FP8Linear``, routed experts, MLA attention core:
      ``r1kernels.train.op_checks``) re-run through its reference from the kernel path's own input and output
      gradient; its output, input and weight gradients, bounded by ``op_tol`` (None: logged), the attention
      core's gradients (``"mla attention gradients"``) by ``attention_grad_tol``, the FP8 experts (``"moe fp8
      experts"``) by ``fp8_experts_tol`` (None: ``op_tol``; ``op_checks.KINDS`` says why they differ).
    - ``"<family>"``: end to end, ``||g - g_ref|| / max(||g_ref||, grad_floor)`` over all the family's
      parameters' gradients together (each parameter's error is measured against its family's gradient scale,
      so a near-zero gradient's round-off cannot dominate; the floor covers a batch with no gradient to speak
      of); the message names the parameter contributing most. ``"loss"`` is ``|l - l_ref| / max(1, |l_ref|)``.
      Both bounded by ``grad_tol`` (None: logged). The reference pass takes the kernel pass's expert choices
      (``PinnedRoutes``)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    outputs, output_where = {}, {}
    hooks = _output_checks(model, outputs, output_where)
    recorder, routes = OpRecorder(model), PinnedRoutes(model)
    try:
        try:
            loss = loss_fn(False)
        finally:
            for h in hooks:
                h.remove()
            recorder.remove()
        for family, err in sorted(outputs.items(), key=lambda kv: -kv[1]):  # the block where the error starts
            if not err <= tol:
                raise KernelMismatch(f"kernel path differs from the reference in op family '{family}' "
                                     f"({output_where[family]}): relative error {err:.3e} > {tol:g}")  # fmt: skip
        loss.backward()
        ops, failed = {}, []
        bars = {"op": op_tol, "attention gradient": attention_grad_tol, "fp8 experts": fp8_experts_tol}
        for err, op, what, kind in recorder.compare():
            family = family_of(op + ".")
            key = f"{family} {LOGGED_AS[kind]}"  # each kind with its bar
            if not err <= ops.get(key, (-1.0,))[0]:  # NaN is kept
                ops[key] = (err, f"{what} of {op}")
            bar = op_tol if bars[kind] is None else bars[kind]
            if bar is not None and not err <= bar:
                failed.append((err, family, f"{what} of {op}", bar))
        if failed:  # the op furthest off
            err, family, what, bar = max(failed, key=lambda f: f[0] / f[3] if f[0] == f[0] else float("inf"))
            raise KernelMismatch(f"kernel path differs from the reference in op family '{family}' ({what}, same "
                                 f"input and output gradient): relative error {err:.3e} > {bar:g}")  # fmt: skip
        grads = {n: p.grad for n, p in params}
        model.zero_grad(set_to_none=True)
        with reference_ops(), routes.pinned():
            ref_loss = loss_fn(True)
        ref_loss.backward()
    finally:
        routes.remove()
    ref_grads = {n: p.grad for n, p in params}
    for n, p in params:  # the kernel path's gradients are the ones the caller steps on
        p.grad = grads[n]
    worst = {"loss": abs(float(loss.detach()) - float(ref_loss.detach())) / max(1.0, abs(float(ref_loss.detach())))}
    where = {"loss": "the loss"}
    diff2, ref2, largest = {}, {}, {}
    for name, _ in params:
        got, want = grads[name], ref_grads[name]
        if want is None and got is None:
            continue
        got = got.double() if got is not None else torch.zeros_like(want, dtype=torch.float64)
        want = want.double() if want is not None else torch.zeros_like(got)
        family, d2 = family_of(name), float((got - want).square().sum())
        diff2[family] = diff2.get(family, 0.0) + d2
        ref2[family] = ref2.get(family, 0.0) + float(want.square().sum())
        if d2 >= largest.get(family, (-1.0, ""))[0]:
            largest[family] = (d2, name)
    for family in diff2:
        worst[family] = diff2[family] ** 0.5 / max(ref2[family] ** 0.5, grad_floor)
        where[family] = largest[family][1]
    for family, err in worst.items():
        if grad_tol is not None and not err <= grad_tol:  # NaN fails too
            raise KernelMismatch(f"kernel path differs from the reference in op family '{family}' ({where[family]}): "
                                 f"relative error {err:.3e} > {grad_tol:g}")  # fmt: skip
    for family, err in outputs.items():
        worst[f"{family} outputs"] = err
    for key, (err, _) in ops.items():
        worst[key] = err
    return loss, worst
