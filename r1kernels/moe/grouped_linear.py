"""Expert linear layers over the expert-sorted rows: ``out[r] = x[r] @ weight[e].T`` with e the row's expert,
with autograd (the input gradient grouped the same way, the weight gradient reduced per expert over its rows)."""

from __future__ import annotations

import functools

import torch

from r1kernels import _alloc, backend
from r1kernels._checks import cdiv, check_tensor, same_device
from r1kernels._ext import cpp_dtype, ext
from r1kernels._launch import launch
from r1kernels._ops import Sample, define_op
from r1kernels.moe.kernels import grouped_gemm as kernel
from r1kernels.moe.permutation import PermutationIndex

_OP = "moe_grouped_linear"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CPU_SMALL_ROWS = 16  # rows (decode) up to which the CPU forward runs csrc/moe/grouped_linear_small_cpu.cpp


@functools.lru_cache(maxsize=256)
def _small_problem(rows: int, n: int, k: int):
    return ext().GroupedLinearProblem(rows=rows, n=n, k=k)


def _valid(x, weight, row_expert, offsets, counts) -> bool:
    """The valid inputs, recognised in one read of each attribute (the named checks below cost ~2.5 us, a
    decode-sized call's budget); it accepts nothing ``_validate``'s checks reject, which run when it says no."""
    try:
        dtype = x.dtype
        if not (dtype in DTYPES and weight.dtype is dtype and row_expert.dtype is _I32 and offsets.dtype is _I64
                and counts.dtype is _I32):  # fmt: skip
            return False
        x_shape, w_shape, r_shape = x.shape, weight.shape, row_expert.shape
        o_shape, c_shape = offsets.shape, counts.shape
        if len(x_shape) != 2 or len(w_shape) != 3 or len(r_shape) != 1 or len(o_shape) != 1 or len(c_shape) != 1:
            return False
        E = w_shape[0]
        if x_shape[1] != w_shape[2] or r_shape[0] != x_shape[0] or c_shape[0] != E or o_shape[0] != E + 1:
            return False
        if not (x.is_contiguous() and weight.is_contiguous() and row_expert.is_contiguous()
                and offsets.is_contiguous() and counts.is_contiguous()):  # fmt: skip
            return False
        return (x.is_cpu and weight.is_cpu and row_expert.is_cpu and offsets.is_cpu and counts.is_cpu) or same_device(
            x, weight, row_expert, offsets, counts)  # fmt: skip
    except AttributeError:  # not tensors
        return False


_I32, _I64 = torch.int32, torch.int64


def _validate(x, weight, row_expert, offsets, counts) -> None:
    if _valid(x, weight, row_expert, offsets, counts):
        return
    check_tensor("x", x, dtypes=DTYPES, ndim=2, contiguous=True)
    check_tensor("weight", weight, dtypes=(x.dtype,), ndim=3, contiguous=True)
    check_tensor("index.row_expert", row_expert, dtypes=(torch.int32,), ndim=1, contiguous=True)
    check_tensor("index.offsets", offsets, dtypes=(torch.int64,), ndim=1, contiguous=True)
    check_tensor("index.counts", counts, dtypes=(torch.int32,), ndim=1, contiguous=True)
    E, _, K = weight.shape
    if x.shape[1] != K:
        raise ValueError(f"weight must be [E, N, K] with K = x.shape[1] = {x.shape[1]}, got {tuple(weight.shape)}")
    if row_expert.shape[0] != x.shape[0] or counts.shape[0] != E or offsets.shape[0] != E + 1:
        shapes = f"row_expert {tuple(row_expert.shape)}, counts {tuple(counts.shape)}, offsets {tuple(offsets.shape)}"
        raise ValueError(f"index must describe x's {x.shape[0]} rows and weight's {E} experts: {shapes}")
    for name, t in (("weight", weight), ("index.row_expert", row_expert), ("index.offsets", offsets),
                    ("index.counts", counts)):  # fmt: skip
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def segment_alignment(device: torch.device) -> int:
    """The ``permutation_index`` alignment ``grouped_linear`` needs on ``device``: 128 where the Triton kernel runs
    (a row tile never spans experts), 1 on the CPU path (no padding rows)."""
    return kernel.SEGMENT if backend.resolve(device, _OP) != "cpu" else 1


def _check_segments(offsets: torch.Tensor) -> None:
    """A GPU row tile must not span experts: segments start on multiples of 128 (checked on the device)."""
    torch._assert_async((offsets % kernel.SEGMENT == 0).all(),
                        "moe grouped linear on a GPU needs permutation_index(..., align=128)")  # fmt: skip


def _launch(a, b, out, ids, counts, M, N, K, E, strides, k_grouped, device):
    cfg = kernel.config(a.element_size())
    tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
    programs = E * tiles if k_grouped else min(tiles, backend.sm_count(device))
    launch(kernel.grouped_gemm_kernel, (programs,), (a, b, out, ids, counts, M, N, K, E, *strides), cfg, device,
           K_GROUPED=k_grouped, PRECISION=kernel.precision(a.element_size()))  # fmt: skip


def _forward(x, weight, row_expert, offsets, counts, transpose_weight=False):
    """out [R, N] = x @ W[e].T per row (transpose_weight: x @ W[e], the input gradient, out [R, K])."""
    E, Nw, Kw = weight.shape
    N = Kw if transpose_weight else Nw
    out = _alloc.empty((x.shape[0], N), x.dtype, x.device)
    if out.numel() == 0:
        return out
    if x.shape[1] == 0:
        return out.zero_()
    if backend.on_cpu(x, _OP):
        if not transpose_weight and x.shape[0] <= CPU_SMALL_ROWS:  # decode: no per-expert loop in Python
            problem = _small_problem(x.shape[0], N, x.shape[1])
            ext().grouped_linear_small_cpu(
                x.data_ptr(), weight.data_ptr(), row_expert.data_ptr(), out.data_ptr(), cpp_dtype(x.dtype), problem
            )  # positional: keywords cost ~1 us here
            return out
        starts, ns = offsets[:-1].tolist(), counts.tolist()
        if sum(ns) != out.shape[0]:  # padding rows (an aligned layout): they stay 0
            out.zero_()
        for e, (lo, n) in enumerate(zip(starts, ns, strict=True)):
            if n:
                torch.mm(x[lo : lo + n], weight[e] if transpose_weight else weight[e].T, out=out[lo : lo + n])
        return out
    _check_segments(offsets)
    # B[n, k]: W[e, n, k] (forward) or W[e, k, n] (input gradient); strides (stride_bn, stride_bk)
    b_strides = (1, Kw) if transpose_weight else (Kw, 1)
    strides = (x.stride(0), 1, *b_strides, Nw * Kw, out.stride(0), 0)
    _launch(x, weight, out, row_expert, counts, x.shape[0], N, x.shape[1], E, strides, False, x.device)
    return out


def _weight_grad(grad_out, x, offsets, counts, E) -> torch.Tensor:
    """dW[e] [N, K] = grad_out[seg].T @ x[seg] over expert e's rows, fp32."""
    N, K = grad_out.shape[1], x.shape[1]
    out = _alloc.empty((E, N, K), torch.float32, x.device)
    if out.numel() == 0:
        return out
    if backend.on_cpu(x, _OP):
        for e, (lo, n) in enumerate(zip(offsets[:-1].tolist(), counts.tolist(), strict=True)):
            if n and x.dtype == torch.float32:
                torch.mm(grad_out[lo : lo + n].T, x[lo : lo + n], out=out[e])
            else:
                out[e] = (grad_out[lo : lo + n].T @ x[lo : lo + n]).float() if n else 0.0
        return out
    # A[n, r] = grad_out[r, n], B[k, r] = x[r, k]; expert e reduces over r in [offsets[e], offsets[e] + counts[e])
    strides = (1, grad_out.stride(0), 1, x.stride(0), 0, K, N * K)
    _launch(grad_out, x, out, offsets, counts, N, K, x.shape[0], E, strides, True, x.device)
    return out


def _fake(x, weight, row_expert, offsets, counts):
    _validate(x, weight, row_expert, offsets, counts)
    return x.new_empty((x.shape[0], weight.shape[1]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    x, weight, row_expert, offsets, counts = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = _forward(grad_out, weight, row_expert, offsets, counts, transpose_weight=True)
    if ctx.needs_input_grad[1]:
        grad_w = _weight_grad(grad_out, x, offsets, counts, weight.shape[0]).to(weight.dtype)
    return grad_x, grad_w, None, None, None


def _samples(device: str):
    from r1kernels.moe.permutation import permutation_index

    ids = torch.randint(0, 4, (50, 2), dtype=torch.int32, device=device)
    index = permutation_index(ids, 4, align=kernel.SEGMENT)
    x = torch.randn(index.source.shape[0], 80, device=device)
    yield Sample((x, torch.randn(4, 48, 80, device=device), index.row_expert, index.offsets, index.counts))


@define_op(_OP, fake=_fake, backward=_backward, setup_context=_setup_context, samples=_samples)
def _grouped_linear_op(
    x: torch.Tensor, weight: torch.Tensor, row_expert: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    _validate(x, weight, row_expert, offsets, counts)
    return _forward(x, weight, row_expert, offsets, counts)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, index: PermutationIndex) -> torch.Tensor:
    """``out[r] = x[r] @ weight[e].T`` for every row r of expert e (0 on padding rows).

    Args:
        x: ``[R, K]`` bfloat16 / float16 / float32 rows in ``index``'s expert-sorted layout (``moe_permute``'s
            output, or an earlier expert layer's), contiguous.
        weight: ``[E, N, K]`` in x's dtype, contiguous: one ``[out, in]`` matrix per expert (HF's
            ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``).
        index: the ``permutation_index``; on a GPU built with ``align=128`` (a row tile never spans experts).

    Returns ``[R, N]`` in x's dtype (fp32 accumulation). Differentiable w.r.t. x (the same grouped product with
    each expert's weight transposed) and weight (per expert, over that expert's rows only, so padding rows
    never enter). GPU: one persistent Triton launch per product; CPU: a matmul per expert segment.
    """
    return _grouped_linear_op(x, weight, index.row_expert, index.offsets, index.counts)
