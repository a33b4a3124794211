"""Block-scaled FP8 GEMM in DeepGEMM's NT layout (``fp8_gemm_nt``): D = (a * a_scales) @ (b * b_scales).T."""

from __future__ import annotations

import functools

import torch

from r1kernels import _alloc, backend, cpu_caps
from r1kernels._checks import cdiv, check_tensor, same_device
from r1kernels._ext import cpp_dtype, ext
from r1kernels._launch import launch
from r1kernels._ops import Sample, define_op
from r1kernels.fp8.kernels import gemm_nt as kernel
from r1kernels.fp8.kernels.e4m3 import hw_fp8_convert
from r1kernels.fp8.tiles import dequantize_tiles

OUT_DTYPES = (torch.bfloat16, torch.float32)
E4M3, F32, I32 = torch.float8_e4m3fn, torch.float32, torch.int32
FP8, SCALES = (E4M3,), (F32,)
BLOCK = kernel.SCALE_BLOCK
CPU_CHUNK_ROWS = 1024  # rows of a and b dequantized at a time on the CPU: bounded fp32 copies
# Few rows (decode): the CPU computes from the codes (csrc/fp8/gemm_small_cpu.cpp) instead of dequantizing b
# to fp32 for a matmul that reads each weight once per row anyway. Above ~16 rows the fp32 matmul wins (or, on
# a CPU with AMX-BF16, the AMX GEMM of csrc/fp8/gemm_amx_cpu.cpp: 1.7-2.3x the fp32 matmul's rate, 2 threads).
CPU_SMALL_ROWS = 16


def validate(a, a_scales, b, b_scales, out_dtype, c, b_tile_rows=BLOCK) -> None:
    """``b_tile_rows``: 128 for weight blocks (b_scales [ceil(N/128), ceil(K/128)]), 1 for row scales like a's."""
    if c is None and read_operands(a, a_scales, b, b_scales, out_dtype, 2, 2, b_tile_rows) is not None:
        return
    for name, t in (("a", a), ("b", b)):
        check_tensor(name, t, dtypes=FP8, ndim=2)
    for name, t in (("a_scales", a_scales), ("b_scales", b_scales)):
        check_tensor(name, t, dtypes=SCALES, ndim=2)
    validate_matrices(a, a_scales, b, b_scales, out_dtype, c, b_tile_rows)


def read_operands(a, a_scales, b, b_scales, out_dtype, a_ndim: int, b_ndim: int, b_tile_rows: int = BLOCK):
    """``(a.shape, b.shape, a.stride(), b.stride())`` when the operands pass every check of ``validate_matrices``
    and the dtype and rank checks before it (a and a_scales ``a_ndim``-D, b and b_scales ``b_ndim``-D), each
    attribute read once (~1.5 us: a decode-sized call's budget, which the checks one by one took twice over);
    else None, and the caller runs those checks, which name what is wrong. The grouped forms check the rest of
    their rules on what it read."""
    try:
        if not (a.dtype is E4M3 and b.dtype is E4M3 and a_scales.dtype is F32 and b_scales.dtype is F32
                and out_dtype in OUT_DTYPES
                and ((a.is_cpu and a_scales.is_cpu and b.is_cpu and b_scales.is_cpu)  # flags first: the usual case
                     or same_device(a, a_scales, b, b_scales))):  # fmt: skip
            return None
        a_shape, b_shape, sa_shape, sb_shape = a.shape, b.shape, a_scales.shape, b_scales.shape
        a_strides, b_strides = a.stride(), b.stride()
    except AttributeError:  # not tensors
        return None
    if len(a_shape) != a_ndim or len(sa_shape) != a_ndim or len(b_shape) != b_ndim or len(sb_shape) != b_ndim:
        return None
    M, K, N = a_shape[-2], a_shape[-1], b_shape[-2]
    k_blocks = -(-K // BLOCK)
    ok = (b_shape[-1] == K and K % 16 == 0 and sa_shape[-2] == M and sa_shape[-1] == k_blocks
          and sb_shape[-2] == -(-N // b_tile_rows) and sb_shape[-1] == k_blocks
          and a_strides[-1] == 1 and (M <= 1 or a_strides[-2] % 16 == 0)
          and b_strides[-1] == 1 and (N <= 1 or b_strides[-2] % 16 == 0))  # fmt: skip
    return (a_shape, b_shape, a_strides, b_strides) if ok else None


def ids_ok(ids, n: int, a) -> bool:
    """The grouped forms' ids (m_indices, masked_m) as their checks want them, read once: a contiguous int32
    vector of n on a's device."""
    try:
        return (ids.dtype is I32 and ids.shape == (n,) and ids.is_contiguous()
                and (ids.is_cpu if a.is_cpu else same_device(a, ids)))  # fmt: skip
    except AttributeError:  # not a tensor
        return False


def validate_matrices(a, a_scales, b, b_scales, out_dtype, c=None, b_tile_rows=BLOCK) -> None:
    """The dense GEMM's rules on the last two dimensions of each operand (dtypes and ranks checked by the
    caller), so that the grouped forms check one expert's operands without indexing one out (~1 us a view)."""
    a_shape, b_shape, sa_shape, sb_shape = a.shape, b.shape, a_scales.shape, b_scales.shape  # indexed, not sliced
    M, K, N = a_shape[-2], a_shape[-1], b_shape[-2]
    if b_shape[-1] != K:
        raise ValueError(f"b must be [N, K] with K = a.shape[-1] = {K}, got {tuple(b.shape[-2:])}")
    if K % 16:
        raise ValueError(f"K must be a multiple of 16 (16-byte rows of e4m3), got K = {K}")
    for name, t, rows in (("a", a, M), ("b", b, N)):
        strides = t.stride()
        if strides[-1] != 1 or (rows > 1 and strides[-2] % 16):
            raise ValueError(f"{name} must be row-major with a row stride that is a multiple of 16 elements, got "
                             f"strides {strides}; call .contiguous() first")  # fmt: skip
    k_blocks = cdiv(K, BLOCK)
    if sa_shape[-2] != M or sa_shape[-1] != k_blocks:
        raise ValueError(f"a_scales must be [M, ceil(K/128)] = {(M, k_blocks)} (1 x 128 groups), "
                         f"got {tuple(a_scales.shape[-2:])}")  # fmt: skip
    if sb_shape[-2] != cdiv(N, b_tile_rows) or sb_shape[-1] != k_blocks:
        what = "[ceil(N/128), ceil(K/128)]", "128 x 128 blocks"
        what = ("[N, ceil(K/128)]", "1 x 128 groups") if b_tile_rows == 1 else what
        raise ValueError(f"b_scales must be {what[0]} = {(cdiv(N, b_tile_rows), k_blocks)} ({what[1]}), "
                         f"got {tuple(b_scales.shape[-2:])}")  # fmt: skip
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {[str(d) for d in OUT_DTYPES]}, got {out_dtype}")
    if not (a.is_cpu and a_scales.is_cpu and b.is_cpu and b_scales.is_cpu):  # flags: device objects cost ~0.3 us
        for name, t in (("a_scales", a_scales), ("b", b), ("b_scales", b_scales)):
            if t.device != a.device:
                raise ValueError(f"{name} must be on a's device {a.device}, got {t.device}")
    if c is not None:
        check_tensor("c", c, dtypes=OUT_DTYPES, ndim=2)
        if c.shape != (M, N) or c.stride(1) != 1:
            raise ValueError(f"c must be [M, N] = {(M, N)} with unit column stride, got {tuple(c.shape)}")
        if c.device != a.device:
            raise ValueError(f"c must be on a's device {a.device}, got {c.device}")


@functools.lru_cache(maxsize=512)
def gemm_problem(groups, m, n, k, b_tile_rows, a_strides, b_strides, sa_strides, sb_strides, c_stride_m, out_strides):
    """The extension's Fp8GemmProblem, cached on sizes and the operands' ``stride()`` tuples as torch gives them
    (2-D, or 3-D with a stride between groups): the decode hot path reads each stride tuple once and builds
    nothing when the geometry repeats."""
    fields = (groups, m, n, k, b_tile_rows, *_strides(a_strides), *_strides(b_strides), *_strides(sa_strides, False),
              *_strides(sb_strides, False), c_stride_m, *_strides(out_strides))  # fmt: skip
    return ext().Fp8GemmProblem(**dict(zip(_PROBLEM_FIELDS, fields, strict=True)))


_PROBLEM_FIELDS = ("groups", "m", "n", "k", "b_tile_rows", "a_stride_g", "a_stride_m", "b_stride_g", "b_stride_n",
                   "sa_stride_g", "sa_stride_m", "sa_stride_k", "sb_stride_g", "sb_stride_n", "sb_stride_k",
                   "c_stride_m", "out_stride_g", "out_stride_m")  # fmt: skip


def cpu_gemm_small(a, a_scales, b, b_scales, out, c=None, b_tile_rows=BLOCK, row_expert=None, masked_m=None) -> bool:
    """``cpu_gemm`` from the codes, for few rows: a [M, K] or [G, M, K] with masked_m (out [G, M, N]); b [N, K]
    or [E, N, K] with row_expert (one expert per row of a, -1 a zero row) or masked_m (expert = group). False,
    with nothing written, when a masked_m entry lies outside [0, M]."""
    a_shape = a.shape
    G, M, K = a_shape if len(a_shape) == 3 else (1, *a_shape)
    problem = gemm_problem(G, M, b.shape[-2], K, b_tile_rows, a.stride(), b.stride(), a_scales.stride(),
                           b_scales.stride(), 0 if c is None else c.stride(0), out.stride())  # fmt: skip
    # positionally: the decode hot path, where matching eleven keywords costs a third of the call
    return ext().fp8_gemm_small_cpu(
        a.data_ptr(), a_scales.data_ptr(), b.data_ptr(), b_scales.data_ptr(), 0 if c is None else c.data_ptr(),
        cpp_dtype((out if c is None else c).dtype), out.data_ptr(), cpp_dtype(out.dtype),
        0 if row_expert is None else row_expert.data_ptr(), 0 if masked_m is None else masked_m.data_ptr(), problem,
    )  # fmt: skip


def _strides(strides: tuple, rows_only: bool = True) -> tuple:
    """(between groups: 0 when 2-D, between rows) or, not ``rows_only``, (.., between columns) too."""
    g = strides[0] if len(strides) == 3 else 0
    return (g, strides[-2]) if rows_only else (g, strides[-2], strides[-1])


def _cpu_gemm_amx(a, a_scales, b, b_scales, out, c, b_tile_rows) -> None:
    """``cpu_gemm`` on AMX tiles (csrc/fp8/gemm_amx_cpu.cpp): the codes are exact in bf16, the products exact, the
    sums fp32 with the scales applied per 128-wide K block, then c added and one rounding into out's dtype, all
    in C++ (no fp32 staging copy)."""
    (M, K), N = a.shape, b.shape[0]
    a_strides, b_strides, out_strides = a.stride(), b.stride(), out.stride()
    if a_strides[1] != 1:
        a = a.contiguous()
        a_strides = a.stride()
    if b_strides[1] != 1:
        b = b.contiguous()
        b_strides = b.stride()
    target = out if out_strides[1] == 1 or N == 1 else torch.empty((M, N), dtype=out.dtype)
    target_strides = out_strides if target is out else target.stride()
    problem = gemm_problem(1, M, N, K, b_tile_rows, a_strides, b_strides, a_scales.stride(), b_scales.stride(),
                           0 if c is None else c.stride(0), target_strides)  # fmt: skip
    ext().fp8_gemm_amx_cpu(a.data_ptr(), a_scales.data_ptr(), b.data_ptr(), b_scales.data_ptr(),
                           0 if c is None else c.data_ptr(), cpp_dtype(out.dtype if c is None else c.dtype),
                           target.data_ptr(), cpp_dtype(out.dtype), problem)  # fmt: skip
    if target is not out:
        out.copy_(target)


def cpu_gemm(a, a_scales, b, b_scales, out, c=None, b_tile_rows=BLOCK) -> None:
    """out = a @ b.T (+ c) on the CPU: on AMX tiles where the CPU has them (``_cpu_gemm_amx``), else tile-wise
    dequantize (the C++ kernel) + fp32 matmul, CPU_CHUNK_ROWS rows of each operand at a time (the grouped GEMMs'
    CPU paths run it per expert); few rows straight from the codes (``cpu_gemm_small``). ``b_tile_rows``: rows
    per b scale, 128 for weight blocks, 1 for the weight gradient's row scales."""
    M, N = out.shape
    if M <= CPU_SMALL_ROWS:
        return cpu_gemm_small(a, a_scales, b, b_scales, out, c, b_tile_rows)
    if cpu_caps.amx_bf16():
        return _cpu_gemm_amx(a, a_scales, b, b_scales, out, c, b_tile_rows)
    for n0 in range(0, N, CPU_CHUNK_ROWS):  # a multiple of 128: whole weight-scale blocks
        n1 = min(N, n0 + CPU_CHUNK_ROWS)
        sb = b_scales[n0 // b_tile_rows : cdiv(n1, b_tile_rows)]
        b32 = dequantize_tiles(b[n0:n1].contiguous(), sb, b_tile_rows, BLOCK, torch.float32, op="gemm_nt")
        for m0 in range(0, M, CPU_CHUNK_ROWS):
            m1 = min(M, m0 + CPU_CHUNK_ROWS)
            a32 = dequantize_tiles(a[m0:m1].contiguous(), a_scales[m0:m1], 1, BLOCK, torch.float32, op="gemm_nt")
            d = a32 @ b32.T
            if c is not None:
                d += c[m0:m1, n0:n1]
            out[m0:m1, n0:n1] = d


def launch_gemm(
    a, a_scales, b, b_scales, out, c, m_indices=None, masked_m=None, k_ranges=None, b_row_scales=False
) -> None:
    """``b`` [N, K]; or [G, N, K] with ``m_indices`` (DeepGEMM's contiguous grouped layout: a [M, K], one
    expert id per row) or with ``masked_m`` (the masked layout: a [G, M, K], out [G, M, N]). ``k_ranges``
    [G, 2] (the weight gradient's K-grouped layout: out [G, M, N], group g sums over K in its range).
    ``b_row_scales``: b has 1 x 128 scales [N, ceil(K/128)] like a, instead of 128 x 128 blocks."""
    K, N = a.shape[-1], b.shape[-2]
    M = a.shape[-2]
    grouped, masked, k_grouped = m_indices is not None, masked_m is not None, k_ranges is not None
    G = a.shape[0] if masked else k_ranges.shape[0] if k_grouped else 1
    arch = backend.device_arch(a.device)
    fp8 = hw_fp8_convert(arch)
    tma = kernel.use_tma(arch, fp8, a, b)
    cfg = kernel.config(M, arch, tma, b_row_scales)
    codes = (a, b) if fp8 else (a.view(torch.uint8), b.view(torch.uint8))
    programs = G * cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])  # one per work item, unless persistent
    persistent = grouped or masked
    if persistent:
        programs = min(programs, backend.sm_count(a.device) * kernel.resident_programs(cfg, arch))
    c_arg = out if c is None else c
    ids = m_indices if grouped else masked_m if masked else k_ranges if k_grouped else out
    per_expert = (b.stride(0), b_scales.stride(0)) if grouped or masked else (0, 0)
    per_group = (a.stride(0) if masked else 0, a_scales.stride(0) if masked else 0,
                 out.stride(0) if masked or k_grouped else 0)  # fmt: skip
    b_groups = b.shape[0] if b.dim() == 3 else 1
    args = (*codes, a_scales, b_scales, c_arg, out, ids, G, b_groups, M, N, K, a.stride(-2) if M > 1 else K,
            b.stride(-2) if N > 1 else K, a_scales.stride(-2), a_scales.stride(-1), b_scales.stride(-2),
            b_scales.stride(-1), c_arg.stride(-2), out.stride(-2), *per_expert, *per_group)  # fmt: skip
    launch(kernel.gemm_nt_kernel, (programs,), args, cfg, a.device, HAS_C=c is not None, FP8_MMA=fp8, USE_TMA=tma,
           GROUPED=grouped, MASKED=masked, K_GROUPED=k_grouped, B_ROW_SCALES=b_row_scales,
           PERSISTENT=persistent)  # fmt: skip


def _fake(a, a_scales, b, b_scales, out_dtype, c):
    validate(a, a_scales, b, b_scales, out_dtype, c)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def _samples(device: str):
    from r1kernels.fp8.quantize_per_block import quantize_per_block
    from r1kernels.fp8.quantize_per_token_group import quantize_per_token_group

    a, sa = quantize_per_token_group(torch.randn(5, 208, device=device))
    b, sb = quantize_per_block(torch.randn(130, 208, device=device))
    yield Sample((a, sa, b, sb, torch.bfloat16, None), ("test_faketensor", "test_aot_dispatch_dynamic"))
    yield Sample((a, sa, b, sb, torch.float32, torch.randn(5, 130, device=device)),
                 ("test_faketensor", "test_aot_dispatch_dynamic"))  # fmt: skip


@define_op("fp8_gemm_nt", fake=_fake, samples=_samples)
def _gemm_nt_op(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    out_dtype: torch.dtype,
    c: torch.Tensor | None,
) -> torch.Tensor:
    validate(a, a_scales, b, b_scales, out_dtype, c)
    out = _alloc.empty((a.shape[0], b.shape[0]), out_dtype, a.device)
    if out.numel() == 0 or a.shape[1] == 0:
        return out.zero_() if c is None else out.copy_(c)
    (cpu_gemm if backend.on_cpu(a, "fp8_gemm_nt") else launch_gemm)(a, a_scales, b, b_scales, out, c)
    return out


def gemm_nt(
    a: torch.Tensor,
    a_scales: torch.Tensor,
    b: torch.Tensor,
    b_scales: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    c: torch.Tensor | None = None,
) -> torch.Tensor:
    """``D [M, N] = (a * a_scales) @ (b * b_scales).T (+ c)``, DeepGEMM's ``fp8_gemm_nt`` layout.

    Args:
        a: ``[M, K] float8_e4m3fn`` row-major (activations), K a multiple of 16, any M.
        a_scales: ``[M, ceil(K/128)] float32``, one per 1 x 128 group, row-major or M-major (any strides), as
            ``quantize_per_token_group`` produces them.
        b: ``[N, K] float8_e4m3fn`` row-major (a weight, ``out_features x in_features``), any N.
        b_scales: ``[ceil(N/128), ceil(K/128)] float32``, one per 128 x 128 block, as ``quantize_per_block``
            produces them; DeepSeek-V3's checkpoints store exactly this as ``weight_scale_inv`` (a multiplier
            despite its name), so their weights load as they are.
        out_dtype: bfloat16 or float32.
        c: optional ``[M, N]`` bfloat16 / float32 added to the product (D = a @ b.T + c; ``c`` is not modified).

    Each 128-wide K block's product is formed in fp32 and scaled into an fp32 sum (DeepSeek-V3's promotion).
    GPU: FP8 tensor cores on sm_89 / sm_90a, fp16 MMA on the exact decoded codes on sm_80. CPU: few rows from
    the codes; more on AMX tiles (the codes exact in bf16, the same promotion) where the CPU has AMX-BF16, else
    tile-wise dequantize + fp32 matmul, CPU_CHUNK_ROWS rows of each operand at a time.
    """
    return _gemm_nt_op(a, a_scales, b, b_scales, out_dtype, c)
