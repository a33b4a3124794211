"""MLA attention for training: one rope key per position shared by all heads (never broadcast in memory),
V tiles sized for Dv, causal or not, packed variable-length sequences; forward and backward."""

from __future__ import annotations

import functools
import itertools

import torch

from r1kernels import _alloc, backend
from r1kernels._checks import cdiv, check_tensor, same_device
from r1kernels._ext import cpp_dtype, ext
from r1kernels._launch import launch
from r1kernels._ops import Sample, define_op
from r1kernels.mla import attention_torch
from r1kernels.mla.kernels import attention_bwd, attention_fwd

_OP = "mla_attention"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Up to this many multiply-adds (B x H x S x S x (D + Dv), causal or not) the CPU forward is one C++ call
# (csrc/mla/attention_small_cpu.cpp): below it the blocked torch path's few dozen small ops cost more than the math
# (1 thread: 131 vs 239 us at 1.3M, 233 vs 309 us at 2.6M bf16, even at ~5M; benchmarks/NOTES.md).
SMALL_MACS = 1 << 21


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def validate(q, k_nope, k_pe, v, cu_seqlens, max_seqlen=None) -> None:
    if cu_seqlens is None and max_seqlen is None and _valid(q, k_nope, k_pe, v):
        return
    check_tensor("q", q, dtypes=DTYPES, ndim=4)
    for name, t, nd in (("k_nope", k_nope, 4), ("k_pe", k_pe, 3), ("v", v, 4)):
        check_tensor(name, t, dtypes=(q.dtype,), ndim=nd)
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    B, S, H, D = q.shape
    dn = k_nope.shape[-1]
    if tuple(k_nope.shape[:3]) != (B, S, H) or tuple(v.shape[:3]) != (B, S, H):
        raise ValueError(f"k_nope and v must be [B, S, H, *] = {(B, S, H)}, got {tuple(k_nope.shape)} and "
                         f"{tuple(v.shape)}")  # fmt: skip
    if tuple(k_pe.shape[:2]) != (B, S):
        raise ValueError(f"k_pe must be [B, S, Dr] = {(B, S)} + (Dr,): one rope key shared by all heads, got "
                         f"{tuple(k_pe.shape)}")  # fmt: skip
    if dn + k_pe.shape[-1] != D:
        raise ValueError(f"q's head dim ({D}) must be k_nope's ({dn}) + k_pe's ({k_pe.shape[-1]})")
    for name, t in (("q", q), ("k_nope", k_nope), ("k_pe", k_pe), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension, got strides {t.stride()}")
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1, contiguous=True)
        if B != 1:
            raise ValueError(f"with cu_seqlens the sequences are packed along S and the batch dim must be 1, got {B}")
        if cu_seqlens.device != q.device or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be [num_seqs + 1] on {q.device}, got {tuple(cu_seqlens.shape)}")
    if max_seqlen is not None and (cu_seqlens is None or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"max_seqlen must be a non-negative int given with cu_seqlens, got {max_seqlen!r}")


def _valid(q, k_nope, k_pe, v) -> bool:
    """Unpacked inputs that pass every check of ``validate``, recognised in one read of each attribute (the named
    checks cost ~3 us, most of a decode-sized call's budget); it accepts nothing they reject."""
    try:
        dtype = q.dtype
        if not (dtype in DTYPES and k_nope.dtype is dtype and k_pe.dtype is dtype and v.dtype is dtype):
            return False
        q_shape, n_shape, p_shape, v_shape = q.shape, k_nope.shape, k_pe.shape, v.shape
        if len(q_shape) != 4 or len(n_shape) != 4 or len(p_shape) != 3 or len(v_shape) != 4:
            return False
        B, S, H, D = q_shape
        if (n_shape[0] != B or n_shape[1] != S or n_shape[2] != H or v_shape[0] != B or v_shape[1] != S
                or v_shape[2] != H or p_shape[0] != B or p_shape[1] != S or n_shape[3] + p_shape[2] != D):  # fmt: skip
            return False
        if q.stride()[3] != 1 or k_nope.stride()[3] != 1 or k_pe.stride()[2] != 1 or v.stride()[3] != 1:
            return False
        return (q.is_cpu and k_nope.is_cpu and k_pe.is_cpu and v.is_cpu) or same_device(q, k_nope, k_pe, v)
    except AttributeError:  # not tensors
        return False


def _check_cu_seqlens(cu: torch.Tensor, S: int, max_seqlen: int | None = None) -> tuple[list[int], int]:
    """(the offsets, the longest sequence), read on the host: one sync on a GPU (see _packing)."""
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != S or any(b > a for a, b in zip(bounds[1:], bounds[:-1], strict=True)):
        raise ValueError(f"cu_seqlens must rise from 0 to S = {S} without decreasing, got {bounds[:8]}...")
    longest = max(b - a for a, b in itertools.pairwise(bounds))
    if max_seqlen is not None and longest > max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) must be at least the longest sequence in cu_seqlens ({longest})")
    return bounds, longest


def _packing(cu: torch.Tensor | None, S: int, max_seqlen: int | None, triton: bool):
    """(host bounds or None, (sequences, longest) for the launch grid or None without cu_seqlens). Given
    ``max_seqlen``, the Triton path never reads cu_seqlens on the host: the offsets are checked on the device
    (no synchronisation; CUDA graphs and ``torch.compile`` keep the call) and the grid is sized by max_seqlen,
    FlashAttention's convention. Otherwise the offsets are read once (the CPU paths need them anyway)."""
    if cu is None:
        return None, None
    if triton and max_seqlen is not None:
        lengths = cu[1:] - cu[:-1]
        ok = (cu[0] == 0) & (cu[-1] == S) & (lengths >= 0).all() & (lengths <= max_seqlen).all()
        torch._assert_async(ok, "cu_seqlens must rise from 0 to S, no sequence longer than max_seqlen")
        return None, (cu.numel() - 1, max_seqlen)
    bounds, longest = _check_cu_seqlens(cu, S, max_seqlen)
    return bounds, (len(bounds) - 1, longest)


def _uses_triton(q, k_nope, k_pe, v) -> bool:
    if q.dtype == torch.float32 or backend.on_cpu(q, _OP):
        return False
    return all(_pow2(d) for d in (k_nope.shape[-1], k_pe.shape[-1], v.shape[-1]))


def _kernel_args(q, k_nope, k_pe, v, o, lse):
    return (q.stride(0), q.stride(1), q.stride(2), k_nope.stride(0), k_nope.stride(1), k_nope.stride(2),
            k_pe.stride(0), k_pe.stride(1), v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1),
            o.stride(2), lse.stride(0), lse.stride(1))  # fmt: skip


def _grid_and_switches(q, k_nope, k_pe, v, causal, block, packed):
    """``packed``: (sequences, longest) of packed input, else None (B sequences of S)."""
    B, S, H, _ = q.shape
    varlen = packed is not None
    seqs, longest = packed if varlen else (B, S)
    switches = dict(DN=k_nope.shape[-1], DR=k_pe.shape[-1], DV=v.shape[-1], CAUSAL=causal, VARLEN=varlen,
                    PRECISION=attention_fwd.PRECISION)  # fmt: skip
    return (max(1, cdiv(longest, block)), seqs * H), switches


@functools.lru_cache(maxsize=256)
def _small_problem(B, S, H, dn, dr, dv, q_stride, kn_stride, kp_stride, v_stride, scale, causal):
    return ext().MlaAttentionProblem(batch=B, seq=S, heads=H, dn=dn, dr=dr, dv=dv, q_stride=q_stride,
                                     kn_stride=kn_stride, kp_stride=kp_stride, v_stride=v_stride, scale=scale,
                                     causal=causal)  # fmt: skip


def _forward_small_cpu(q, k_nope, k_pe, v, causal, scale, cu_seqlens, max_seqlen, out, lse) -> None:
    B, S, H, _ = q.shape
    if max_seqlen is not None:  # the bound is not needed here, but a wrong one is refused on every path
        _check_cu_seqlens(cu_seqlens, S, max_seqlen)
    problem = _small_problem(B, S, H, k_nope.shape[-1], k_pe.shape[-1], v.shape[-1], q.stride()[:3],
                             k_nope.stride()[:3], k_pe.stride()[:2], v.stride()[:3], scale, causal)  # fmt: skip
    cu, seqs = (0, 0) if cu_seqlens is None else (cu_seqlens.data_ptr(), cu_seqlens.shape[0] - 1)
    pointers = (q.data_ptr(), k_nope.data_ptr(), k_pe.data_ptr(), v.data_ptr())
    if not ext().mla_attention_small_cpu(*pointers, cpp_dtype(q.dtype), cu, seqs, out.data_ptr(), lse.data_ptr(),
                                         problem):  # fmt: skip
        _check_cu_seqlens(cu_seqlens, S)  # raises, naming the argument
        raise AssertionError("mla_attention_small_cpu refused cu_seqlens that pass the check")


def _forward(q, k_nope, k_pe, v, causal, scale, cu_seqlens, max_seqlen):
    B, S, H, D = q.shape
    out = _alloc.empty((B, S, H, v.shape[-1]), q.dtype, q.device)
    lse = _alloc.empty((B, H, S), torch.float32, q.device)
    if out.numel() == 0 or S == 0:
        return out, lse
    triton = _uses_triton(q, k_nope, k_pe, v)
    if not triton and q.device.type == "cpu" and B * H * S * S * (D + v.shape[-1]) <= SMALL_MACS:
        _forward_small_cpu(q, k_nope, k_pe, v, causal, scale, cu_seqlens, max_seqlen, out, lse)
        return out, lse
    bounds, packed = _packing(cu_seqlens, S, max_seqlen, triton)
    if not triton:
        if cu_seqlens is None:  # the whole batch at once
            o, l_ = attention_torch.forward(q, k_nope, k_pe, v, causal, scale)
            out.copy_(o)
            lse.copy_(l_)
            return out, lse
        for lo, hi in itertools.pairwise(bounds):  # packed sequences one at a time
            o, l_ = attention_torch.forward(q[:, lo:hi], k_nope[:, lo:hi], k_pe[:, lo:hi], v[:, lo:hi], causal, scale)
            out[:, lo:hi] = o
            lse[:, :, lo:hi] = l_
        return out, lse
    arch = backend.device_arch(q.device)
    cfg = attention_fwd.config(q.shape[-1], v.shape[-1], arch)
    grid, switches = _grid_and_switches(q, k_nope, k_pe, v, causal, cfg["BLOCK_M"], packed)
    args = (q, k_nope, k_pe, v, out, lse, cu_seqlens if cu_seqlens is not None else lse, S, H, scale,
            *_kernel_args(q, k_nope, k_pe, v, out, lse))  # fmt: skip
    launch(attention_fwd.mla_fwd_kernel, grid, args, cfg, q.device, **switches)
    return out, lse


def _backward_grads(q, k_nope, k_pe, v, out, lse, d_out, causal, scale, cu_seqlens, max_seqlen):
    S, H = q.shape[1], q.shape[2]
    d_out = d_out.contiguous()
    triton = _uses_triton(q, k_nope, k_pe, v)
    bounds, packed = _packing(cu_seqlens, S, max_seqlen, triton)
    if not triton:
        pieces = [(0, S)] if bounds is None else list(itertools.pairwise(bounds))
        grads = [torch.zeros(t.shape, dtype=torch.float32, device=q.device) for t in (q, k_nope, k_pe, v)]
        for lo, hi in pieces:
            piece = (t[:, lo:hi] for t in (q, k_nope, k_pe, v, out))
            parts = attention_torch.backward(*piece, lse[:, :, lo:hi], d_out[:, lo:hi], causal, scale)
            for g, part in zip(grads, parts, strict=True):
                g[:, lo:hi] = part
        return tuple(g.to(q.dtype) for g in grads)
    delta = (d_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, S]
    dq, dkn, dkp, dv = (torch.empty_like(t) for t in (q, k_nope, k_pe, v))
    arch = backend.device_arch(q.device)
    strides = _kernel_args(q, k_nope, k_pe, v, d_out, lse)
    cu = cu_seqlens if cu_seqlens is not None else lse
    kv_cfg = attention_bwd.kv_config(q.shape[-1], v.shape[-1], arch)
    grid, switches = _grid_and_switches(q, k_nope, k_pe, v, causal, kv_cfg["BLOCK_N"], packed)
    grid = (grid[0], grid[1] // H)  # one program per (key block, sequence): it walks the heads
    launch(attention_bwd.mla_bwd_kv_kernel, grid, (q, k_nope, k_pe, v, d_out, lse, delta, dkn, dkp, dv, cu, S, H,
           scale, *strides), kv_cfg, q.device, **switches)  # fmt: skip
    q_cfg = attention_bwd.q_config(q.shape[-1], v.shape[-1], arch)
    grid, switches = _grid_and_switches(q, k_nope, k_pe, v, causal, q_cfg["BLOCK_M"], packed)
    launch(attention_bwd.mla_bwd_q_kernel, grid, (q, k_nope, k_pe, v, d_out, lse, delta, dq, cu, S, H, scale,
           *strides), q_cfg, q.device, **switches)  # fmt: skip
    return dq, dkn, dkp, dv


def _fake(q, k_nope, k_pe, v, causal, softmax_scale, cu_seqlens, max_seqlen):
    validate(q, k_nope, k_pe, v, cu_seqlens, max_seqlen)
    B, S, H, _ = q.shape
    return q.new_empty((B, S, H, v.shape[-1])), q.new_empty((B, H, S), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k_nope, k_pe, v, causal, scale, cu_seqlens, max_seqlen = inputs
    ctx.save_for_backward(q, k_nope, k_pe, v, output[0], output[1], cu_seqlens)
    ctx.options = (causal, scale, max_seqlen)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, d_out, _d_lse):
    q, k_nope, k_pe, v, out, lse, cu_seqlens = ctx.saved_tensors
    causal, scale, max_seqlen = ctx.options
    grads = _backward_grads(q, k_nope, k_pe, v, out, lse, d_out, causal, scale, cu_seqlens, max_seqlen)
    return (*grads, None, None, None, None)


def _samples(device: str):
    def rand(*shape):
        return torch.randn(shape, device=device).to(torch.bfloat16)

    q, kn, kp, v = rand(2, 19, 3, 48), rand(2, 19, 3, 32), rand(2, 19, 16), rand(2, 19, 3, 32)
    yield Sample((q, kn, kp, v, True, 0.2, None, None))
    cu = torch.tensor([0, 7, 19], dtype=torch.int32, device=device)
    yield Sample((q[:1], kn[:1], kp[:1], v[:1], False, 0.2, cu, None))
    yield Sample((q[:1], kn[:1], kp[:1], v[:1], True, 0.2, cu, 12))


@define_op(_OP, fake=_fake, backward=_backward, setup_context=_setup_context, samples=_samples)
def _mla_op(
    q: torch.Tensor,
    k_nope: torch.Tensor,
    k_pe: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    validate(q, k_nope, k_pe, v, cu_seqlens, max_seqlen)
    return _forward(q, k_nope, k_pe, v, causal, softmax_scale, cu_seqlens, max_seqlen)


def mla_attention(
    q: torch.Tensor,
    k_nope: torch.Tensor,
    k_pe: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head latent attention (DeepSeek-V3's training form): ``softmax((q_nope k_nope^T + q_pe k_pe^T) *
    scale) v`` per head.

    Args:
        q: ``[B, S, H, Dn + Dr]`` bfloat16 / float16 / float32 (nope part first, then rope part).
        k_nope: ``[B, S, H, Dn]``. k_pe: ``[B, S, Dr]``, ONE rope key per position for all heads. v: ``[B, S,
            H, Dv]``. All in q's dtype, unit stride in the last dimension. DeepSeek-V3: Dn 128, Dr 64, Dv 128.
        causal: mask keys after the query. softmax_scale: default ``(Dn + Dr) ** -0.5``.
        cu_seqlens: optional ``[num_seqs + 1] int32`` packed-sequence offsets (rising from 0 to S); B must be 1.
        max_seqlen: with cu_seqlens, an upper bound on the longest sequence (FlashAttention's ``max_seqlen``;
            HF's ``max_length_q``). Given, the GPU path sizes its grid by it and checks the offsets on the device:
            no host synchronisation (CUDA graphs, ``torch.compile``). Without it cu_seqlens is read once.

    Returns ``(out [B, S, H, Dv] in q's dtype, lse [B, H, S] float32)``. Differentiable w.r.t. q, k_nope, k_pe
    and v (``lse`` is not); k_pe's gradient is reduced over the heads inside the kernel, in head order, without
    atomics (bitwise reproducible).
    GPU, 16-bit, power-of-two head dims: Triton (FlashAttention-2 style forward and backward). CPU and fp32:
    blocked torch ops with an online softmax, O(S x 256) memory per head; on the CPU a forward of up to
    ``SMALL_MACS`` multiply-adds is one C++ call (fp32 math).
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return _mla_op(q, k_nope, k_pe, v, causal, float(scale), cu_seqlens, max_seqlen)
