"""torch.library registration shared by every op: one namespace, a fake kernel always, autograd where the op
has a backward, sample inputs for the opcheck test, and cheap eager calls.

``define_op`` registers the decorated implementation as ``torch.ops.r1k.<name>`` and returns an ``Op``
handle, which the public function calls. Under ``torch.compile`` the handle calls the registered op, so
the op stays one opaque node of the graph (its fake kernel gives shapes); so does any other tracing (a
dispatch mode, tensor subclasses). In plain eager mode it calls the
implementation directly (through an ``autograd.Function`` built from the same backward when a gradient is
needed): torch.library's dispatch costs tens of microseconds per call, which decode-sized calls cannot
afford. The implementation validates its inputs itself, once per call on either path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

NAMESPACE = "r1k"


class Sample(NamedTuple):
    """Arguments of one opcheck run; ``test_utils`` narrows the checks (None: all of them)."""

    args: tuple
    test_utils: tuple[str, ...] | None = None


class Op:
    """A registered op: call it like the op. ``op`` is the ``torch.ops`` overload, ``impl`` the implementation,
    ``samples(device)`` yields the ``Sample``s that the opcheck test runs. ``triton``: whether the GPU path is a
    Triton kernel (False: CUDA C++ only, e.g. routing and the permutation index)."""

    def __init__(self, name: str, impl: Callable, op: Any, autograd: type | None, samples: Callable | None,
                 triton: bool = True):  # fmt: skip
        self.name, self.impl, self.op, self.autograd, self.samples = name, impl, op, autograd, samples
        self.triton = triton

    def __call__(self, *args: Any) -> Any:
        if _is_compiling() or _dispatch_modes():
            return self.op(*args)
        # the types of all arguments in one C-level pass; only an unusual one (a tensor subclass traces, lists
        # are passed through) needs the per-argument look
        if not _PLAIN_KINDS.issuperset(map(type, args)):
            for a in args:
                if isinstance(a, _Tensor) and type(a) is not _Tensor and type(a) is not _Parameter:
                    return self.op(*args)
        if self.autograd is not None and _grad_enabled():
            for a in args:
                if (type(a) is _Tensor or type(a) is _Parameter) and a.requires_grad:
                    return self.autograd.apply(*args)
        return self.impl(*args)


OPS: dict[str, Op] = {}


def _tracing() -> bool:
    """torch.compile, or a dispatch mode (make_fx, fake tensors, functionalization, opcheck's AOT tracing)."""
    return torch.compiler.is_compiling() or bool(torch._C._len_torch_dispatch_stack())


def plain_eager(args: tuple) -> bool:
    """True when nothing traces this call: no tracing and only plain tensors."""
    return not _tracing() and all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


_PLAIN = (torch.Tensor, torch.nn.Parameter)
# Bound once: Op.__call__ runs on every eager call, where each attribute lookup is a measurable share of a
# decode-sized op (benchmarks/bench_dispatch.py).
_Tensor, _Parameter = _PLAIN
_PLAIN_KINDS = frozenset((*_PLAIN, type(None), bool, int, float, str, torch.dtype, torch.device))
_is_compiling, _dispatch_modes, _grad_enabled = (torch.compiler.is_compiling, torch._C._len_torch_dispatch_stack,
                                                 torch.is_grad_enabled)  # fmt: skip


def define_op(
    name: str,
    *,
    fake: Callable,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
    mutates_args: tuple[str, ...] = (),
    samples: Callable[[str], Iterable[Sample]] | None = None,
    triton: bool = True,
) -> Callable[[Callable], Op]:
    """Decorator: register ``fn`` as ``torch.ops.r1k.<name>`` with its fake (meta) kernel and, when given, its
    backward (``setup_context(ctx, inputs, output)`` / ``backward(ctx, *grads)``, torch.library's convention).
    ``triton=False`` declares an op whose GPU path is CUDA C++ (the launch test then expects no Triton launch).
    The decorated function's type hints define the op's schema; it must validate its own inputs."""

    def wrap(fn: Callable) -> Op:
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args)(fn)
        op.register_fake(fake)
        autograd = None
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
            autograd = type(
                f"{name}_eager_autograd",
                (torch.autograd.Function,),
                {"forward": staticmethod(fn), "setup_context": staticmethod(setup_context),
                 "backward": staticmethod(backward)},
            )  # fmt: skip
        handle = Op(name, fn, op, autograd, samples, triton)
        OPS[name] = handle
        return handle

    return wrap
