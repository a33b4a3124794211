"""torch.library registration shared by every op: one namespace, a fake kernel always, autograd
where the op has a backward. Registered ops are listed in OPS so tests can opcheck each one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

NAMESPACE = "r1k"
OPS: dict[str, Any] = {}


def define_op(
    name: str,
    *,
    fake: Callable,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
    mutates_args: tuple[str, ...] = (),
) -> Callable[[Callable], Any]:
    """Decorator: register ``fn`` as ``torch.ops.r1k.<name>`` with its fake (meta) kernel and, when
    given, its backward. The decorated function's type hints define the op's schema."""

    def wrap(fn: Callable) -> Any:
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args)(fn)
        op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
        OPS[name] = op
        return op

    return wrap
