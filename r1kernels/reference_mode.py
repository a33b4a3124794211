"""One switch between the kernel ops and the plain PyTorch references, for whole-model validation: inside
``reference_ops()`` the layers that have a kernel path (MLA attention, MoE routing and experts) compute with
their family's ``reference.py`` (float64) instead, so a training step can be run both ways and compared."""

from __future__ import annotations

import contextlib
import contextvars

_REFERENCE = contextvars.ContextVar("r1kernels_reference_ops", default=False)


def use_reference() -> bool:
    """True inside ``reference_ops()``."""
    return _REFERENCE.get()


@contextlib.contextmanager
def reference_ops(enabled: bool = True):
    token = _REFERENCE.set(enabled)
    try:
        yield
    finally:
        _REFERENCE.reset(token)
