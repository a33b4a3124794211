"""What the GRPO kernels share: the recompute of one logits tile, ``expm1`` and the fp32 dot policy."""

from __future__ import annotations

import triton
import triton.language as tl

# (Triton type, bytes per element, dot precision) of the registered variants: fp32 twice, for torch's two
# fp32 matmul policies.
DTYPE_CASES = (("bf16", 2, "tf32"), ("fp16", 2, "tf32"), ("fp32", 4, "tf32"), ("fp32", 4, "ieee"))


def dot_precision(dtype_bytes: int, allow_tf32: bool) -> str:
    """fp32 inputs follow torch's matmul policy: TF32 tensor cores only when torch allows them
    (``torch.set_float32_matmul_precision("high")``), otherwise full-precision FMA ("ieee"). 16-bit inputs
    always run on tensor cores (the setting does not apply to them)."""
    return "tf32" if dtype_bytes < 4 or allow_tf32 else "ieee"


def case_tag(tl_type: str, dtype_bytes: int, precision: str) -> tuple[str, str]:
    """(variant name tag, registry kind) of a dtype case: full-fp32 dots run on the FMA units by request."""
    tag = tl_type if dtype_bytes < 4 else f"{tl_type},{precision}"
    return tag, "matrix" if precision == "tf32" else "fma"


def use_tma(arch: int | None, elt: int, *tensors) -> bool:
    """Operands through TMA (tensor descriptors, bulk copies into shared memory) on sm_90+ for 16-bit inputs
    whose base addresses and row strides are 16-byte aligned, the hardware's requirement; otherwise the
    pointer loads (cp.async). The interpreter (arch None) takes the pointer loads unless a test forces TMA."""
    if arch is None or arch < 90 or elt != 2:
        return False
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * elt) % 16 == 0 for t in tensors)


@triton.jit
def operand_sources(
    h_ptr, w_ptr, N, V, H, stride_h, stride_w,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """What ``logits_tile`` reads hidden and weight tiles from: tensor descriptors (made once per program) with
    USE_TMA, else the raw pointers."""
    if USE_TMA:
        h_src = tl.make_tensor_descriptor(h_ptr, shape=[N, H], strides=[stride_h, 1], block_shape=[BLOCK_N, BLOCK_H])
        w_src = tl.make_tensor_descriptor(w_ptr, shape=[V, H], strides=[stride_w, 1], block_shape=[BLOCK_V, BLOCK_H])
        return h_src, w_src
    else:
        return h_ptr, w_ptr


@triton.jit
def logits_tile(
    h_src, w_src, b_ptr, rows, cols, row0, col0, N, V, H, stride_h, stride_w, inv_t,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """z[BLOCK_N, BLOCK_V] = (hidden[rows] @ weight[cols].T + bias[cols]) / T in fp32; -inf past V. ``rows`` /
    ``cols`` start at ``row0`` / ``col0``; the sources come from ``operand_sources`` (TMA zero-fills past the
    edges the pointer path masks)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    k = tl.arange(0, BLOCK_H)
    for h0 in tl.range(0, H, BLOCK_H):  # pipelined to the launch's num_stages
        if USE_TMA:
            a = h_src.load([row0, h0])
            b = w_src.load([col0, h0])
        else:
            kh = h0 + k
            a = tl.load(h_src + rows[:, None] * stride_h + kh[None, :], mask=(rows[:, None] < N) & (kh[None, :] < H),
                        other=0.0)  # fmt: skip
            b = tl.load(w_src + cols[:, None] * stride_w + kh[None, :], mask=(cols[:, None] < V) & (kh[None, :] < H),
                        other=0.0)  # fmt: skip
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    z = acc * inv_t
    return tl.where(cols[None, :] < V, z, float("-inf"))


@triton.jit
def expm1(x):
    """exp(x) - 1 without cancellation near 0 (a cubic Taylor term below |x| = 1e-2, relative error < 1e-8)."""
    small = x * (1.0 + x * (0.5 + x * (1.0 / 6.0)))
    return tl.where(tl.abs(x) < 1e-2, small, tl.exp(x) - 1.0)
