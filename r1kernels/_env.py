"""Environment switches read on every call (tests and users set them at run time), at the price of a dict lookup."""

from __future__ import annotations

import os
from collections.abc import Callable


def reader(name: str) -> Callable[[], str | None]:
    """A function returning the variable ``name``'s value or None, read afresh on every call. ``os.environ.get``
    costs ~0.7 us when the variable is unset (it raises and catches KeyError inside), a fifth of a decode-sized
    op's whole budget; CPython's mapping behind ``os.environ`` (kept in step by every ``os.environ[...] = ...``,
    ``putenv`` aside) answers in a dict lookup. Elsewhere: the public way."""
    data, encode, decode = (getattr(os.environ, attr, None) for attr in ("_data", "encodekey", "decodevalue"))
    if isinstance(data, dict) and callable(encode) and callable(decode):
        key = encode(name)

        def read() -> str | None:
            raw = data.get(key)
            return None if raw is None else decode(raw)

        return read
    return lambda: os.environ.get(name)
