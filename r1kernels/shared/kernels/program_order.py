"""Program order: which output tile a program computes."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, n_rows, n_cols, GROUP: tl.constexpr):
    """(row, col) of program ``pid`` in a grouped order: consecutive programs sweep GROUP row blocks, then the
    next column, so the programs resident at once share GROUP row operands and ~waves/GROUP column operands
    in L2 instead of each streaming its own (the GROUP_M swizzle of a tiled matmul)."""
    width = GROUP * n_cols
    first = (pid // width) * GROUP
    size = tl.minimum(n_rows - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size
