"""Checks read off a kernel's Triton IR (TTIR) that the interpreter cannot make.

``int32_index_products``: Triton indices (``tl.program_id``, ``tl.arange``, loop counters) are 32-bit, and
so are integer kernel arguments (sizes, strides). A 32-bit product of the two wraps past 2**31 at real shapes
(a K index times a row stride over a 152064 x 16384 matrix), while the interpreter computes it in 64 bits
and never shows it. This finds every ``arith.muli`` producing i32 whose one operand derives from an index
and whose other derives from a runtime integer argument. Casting the index to int64 first (or advancing a
pointer by ``BLOCK * stride``, a product of a constant and an argument) clears it.
"""

from __future__ import annotations

import re

_ARG = re.compile(r"%([\w.$-]+): i(?:32|64)\b")
_FUNC = re.compile(r"tt\.func\b[^(]*\((.*)\)\s*(?:attributes|\{)")
_DEF = re.compile(r"^\s*%([\w.$-]+)(?::\d+)?\s*=\s*([\w.]+)\b(.*)$")
_FOR = re.compile(r"scf\.for\s+%([\w.$-]+)\s*=")
_USE = re.compile(r"%([\w.$-]+)")
_INDEX_SOURCES = ("tt.get_program_id", "tt.make_range")


def int32_index_products(ttir: str) -> list[str]:
    """Lines of ``ttir`` that multiply an int32 index by a runtime integer in 32 bits."""
    taint: dict[str, set[str]] = {}
    header = _FUNC.search(ttir)
    if header:
        for name in _ARG.findall(header.group(1)):
            taint[name] = {"arg"}
    found = []
    for line in ttir.splitlines():
        loop = _FOR.search(line)
        if loop:
            taint[loop.group(1)] = {"index"}
        m = _DEF.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        operands = rest.split(":")[0]
        if op in _INDEX_SOURCES:
            taint[name] = {"index"}
            continue
        if op == "arith.constant":
            taint[name] = set()
            continue
        uses = [u for u in _USE.findall(operands) if u in taint]
        taint[name] = set().union(*(taint[u] for u in uses)) if uses else set()
        if op == "arith.muli" and len(uses) == 2 and _result_is_i32(rest):
            a, b = (taint[u] for u in uses)
            if ("index" in a and "arg" in b) or ("arg" in a and "index" in b):
                found.append(line.strip())
    return found


def _result_is_i32(rest: str) -> bool:
    result_type = rest.split(":")[-1].split("loc(")[0].strip()
    return result_type == "i32" or result_type.endswith("xi32>")
