"""MLA decode over a paged latent cache (FlashMLA's layout and conventions), and the cache append."""

from __future__ import annotations

import functools

import torch

from r1kernels import _alloc, backend
from r1kernels._checks import cdiv, check_tensor
from r1kernels._ext import cpp_dtype, ext
from r1kernels._launch import launch
from r1kernels._ops import Sample, define_op
from r1kernels.mla.kernels import decode as kernel

_OP = "mla_decode"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LATENT, ROPE = 512, 64
PAGES = kernel.PAGES


def validate(q, kv_cache, block_table, cache_seqlens, head_dim_v) -> None:
    if _valid(q, kv_cache, block_table, cache_seqlens, head_dim_v):
        return
    check_tensor("q", q, dtypes=DTYPES, ndim=4, contiguous=True)
    check_tensor("kv_cache", kv_cache, dtypes=(q.dtype,), ndim=3, contiguous=True)
    if block_table.dtype == torch.int64:
        raise TypeError("block_table must be int32 (FlashMLA's layout), got int64; convert with .int()")
    check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, contiguous=True)
    check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1, contiguous=True)
    B = q.shape[0]
    if q.shape[-1] != LATENT + ROPE or kv_cache.shape[-1] != LATENT + ROPE:
        raise ValueError(f"q and kv_cache must have {LATENT + ROPE} columns (latent {LATENT} + rope {ROPE}), got "
                         f"{q.shape[-1]} and {kv_cache.shape[-1]}")  # fmt: skip
    if head_dim_v != LATENT:
        raise ValueError(f"head_dim_v must be {LATENT} (the latent width), got {head_dim_v}")
    if kv_cache.shape[1] not in PAGES:
        raise ValueError(f"kv_cache's page size must be one of {PAGES}, got {kv_cache.shape[1]}")
    if block_table.shape[0] != B or cache_seqlens.shape[0] != B:
        raise ValueError(f"block_table and cache_seqlens must have one row per sequence ({B}), got "
                         f"{tuple(block_table.shape)} and {tuple(cache_seqlens.shape)}")  # fmt: skip
    for name, t in (("kv_cache", kv_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")


def _valid(q, kv_cache, block_table, cache_seqlens, head_dim_v) -> bool:
    """The valid CPU inputs recognised by attribute reads (a decode step's budget); it accepts nothing that
    ``validate``'s checks reject, which run whenever this says no and name what is wrong."""
    try:
        if not (q.is_cpu and kv_cache.is_cpu and block_table.is_cpu and cache_seqlens.is_cpu):
            return False
        q_shape, kv_shape, table_shape, lengths_shape = q.shape, kv_cache.shape, block_table.shape, cache_seqlens.shape
        width = LATENT + ROPE
        return (q.dtype in DTYPES and kv_cache.dtype is q.dtype and block_table.dtype is _I32
                and cache_seqlens.dtype is _I32 and len(q_shape) == 4 and len(kv_shape) == 3
                and len(table_shape) == 2 and len(lengths_shape) == 1 and q_shape[3] == width
                and kv_shape[2] == width and head_dim_v == LATENT and kv_shape[1] in PAGES
                and table_shape[0] == q_shape[0] and lengths_shape[0] == q_shape[0]
                and q.is_contiguous() and kv_cache.is_contiguous() and block_table.is_contiguous()
                and cache_seqlens.is_contiguous())  # fmt: skip
    except AttributeError:  # not tensors
        return False


_I32 = torch.int32


def check_lengths(cache_seqlens, block_table, page, num_blocks) -> None:
    """Lengths within the table and table entries within the cache (device-side on a GPU: no sync)."""
    capacity = block_table.shape[1] * page
    ok = ((cache_seqlens >= 0) & (cache_seqlens <= capacity)).all()
    if cache_seqlens.device.type != "cpu":
        torch._assert_async(ok, "cache_seqlens must lie in [0, max_blocks * page]")
        return
    if not bool(ok):
        raise ValueError(f"cache_seqlens must lie in [0, block_table.shape[1] * page] = [0, {capacity}], got "
                         f"{cache_seqlens.tolist()[:8]}")  # fmt: skip
    used = torch.arange(block_table.shape[1]) < ((cache_seqlens + page - 1) // page)[:, None]
    if used.any() and not bool(((block_table[used] >= 0) & (block_table[used] < num_blocks)).all()):
        raise ValueError(f"block_table's used entries must lie in [0, num_blocks) = [0, {num_blocks})")


def _decode_torch(q, kv_cache, block_table, cache_seqlens, scale, causal, out, lse) -> None:
    """All sequences at once over their table's pages (slots past a length are zeroed before any product, so
    whatever they hold never reaches a result)."""
    B, s_q, H, _ = q.shape
    page = kv_cache.shape[1]
    used = (cache_seqlens.long() + page - 1) // page  # pages each sequence uses; the rest of its table is not read
    table = torch.where(torch.arange(block_table.shape[1], device=q.device) < used[:, None], block_table.long(), 0)
    keys = kv_cache[table].reshape(B, -1, LATENT + ROPE).float()  # [B, L, 576]
    pos = torch.arange(keys.shape[1], device=q.device)
    valid = pos[None, :] < cache_seqlens.long()[:, None]  # [B, L]
    keys = torch.where(valid[..., None], keys, 0.0)
    rows = q.reshape(B, s_q * H, -1).float()
    s = torch.bmm(rows, keys.transpose(1, 2)) * scale  # [B, s_q * H, L]
    visible = valid[:, None, :].expand(B, s_q * H, -1)
    if causal:  # bottom-right aligned: query i sees keys j <= len - s_q + i
        i = torch.arange(s_q, device=q.device).repeat_interleave(H)
        visible = visible & (pos[None, None, :] <= (cache_seqlens.long()[:, None] - s_q + i[None, :])[..., None])
    s = s.masked_fill(~visible, float("-inf"))
    row_lse = torch.logsumexp(s, dim=-1)  # [B, s_q * H]
    empty = torch.isinf(row_lse) & (row_lse < 0)
    p = torch.exp(s - torch.where(empty, 0.0, row_lse)[..., None])
    o = torch.bmm(p, keys[..., :LATENT])
    out.copy_(torch.where(empty[..., None], 0.0, o).view(B, s_q, H, LATENT))
    lse.copy_(torch.where(empty, float("inf"), row_lse).view(B, s_q, H).transpose(1, 2))


@functools.lru_cache(maxsize=256)
def _cpu_problem(batch, s_q, heads, page, max_blocks, num_blocks, scale, causal):
    return ext().MlaDecodeProblem(batch=batch, s_q=s_q, heads=heads, page=page, max_blocks=max_blocks,
                                  num_blocks=num_blocks, scale=scale, causal=causal)  # fmt: skip


def _decode_cpu(q, kv_cache, block_table, cache_seqlens, scale, causal, out, lse) -> None:
    """The C++ twin (csrc/mla/decode_cpu.cpp); it checks the lengths and the used table entries first."""
    B, s_q, H, _ = q.shape
    (num_blocks, page, _), max_blocks = kv_cache.shape, block_table.shape[1]
    # positionally: matching eight keywords is a visible share of a decode step
    problem = _cpu_problem(B, s_q, H, page, max_blocks, num_blocks, float(scale), bool(causal))
    status = ext().mla_decode_cpu(q.data_ptr(), kv_cache.data_ptr(), cpp_dtype(q.dtype), block_table.data_ptr(),
                                  cache_seqlens.data_ptr(), out.data_ptr(), lse.data_ptr(), problem)  # fmt: skip
    if int(status) != 0:  # not MlaDecodeStatus.ok
        check_lengths(cache_seqlens, block_table, page, num_blocks)  # raises the error that names the argument
        raise AssertionError(f"mla_decode_cpu reported {status} but the inputs pass the checks")


def _decode_triton(q, kv_cache, block_table, cache_seqlens, scale, causal, out, lse) -> None:
    B, s_q, H, _ = q.shape
    R, page = s_q * H, kv_cache.shape[1]
    splits = kernel.SPLITS
    cfg = kernel.config(page)
    keys_per_split = cdiv(cdiv(block_table.shape[1] * page, splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    o_part = torch.empty(B, splits, R, LATENT, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B, splits, R, dtype=torch.float32, device=q.device)
    grid = (B, cdiv(R, cfg["BLOCK_H"]), splits)
    args = (q, kv_cache, block_table, cache_seqlens, o_part, lse_part, R, H, s_q, keys_per_split, scale, q.stride(0),
            kv_cache.stride(0), block_table.stride(0))  # fmt: skip
    for half in (0, 1):
        launch(kernel.mla_decode_split_kernel, grid, args, cfg, q.device, CAUSAL=causal, PAGE=page, SPLITS=splits,
               VALUE_HALF=half)  # fmt: skip
    launch(kernel.mla_decode_combine_kernel, (B, R), (o_part, lse_part, out, lse, R, H, s_q), kernel.combine_config(),
           q.device, SPLITS=splits)  # fmt: skip


def _fake(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal, head_dim_v):
    validate(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    B, s_q, H, _ = q.shape
    return q.new_empty((B, s_q, H, LATENT)), q.new_empty((B, H, s_q), dtype=torch.float32)


def _samples(device: str):
    cache = torch.randn(6, 16, 576, device=device).to(torch.bfloat16)
    table = torch.tensor([[3, 1, 0], [5, 2, 4]], dtype=torch.int32, device=device)
    lengths = torch.tensor([40, 0], dtype=torch.int32, device=device)
    q = torch.randn(2, 2, 3, 576, device=device).to(torch.bfloat16)
    yield Sample((q, cache, table, lengths, 0.07, True, LATENT))


@define_op(_OP, fake=_fake, samples=_samples)
def _decode_op(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    head_dim_v: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    validate(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    B, s_q, H, _ = q.shape
    out = _alloc.empty((B, s_q, H, LATENT), q.dtype, q.device)
    lse = _alloc.empty((B, H, s_q), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    if backend.on_cpu(q, _OP):
        _decode_cpu(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal, out, lse)
        return out, lse
    check_lengths(cache_seqlens, block_table, kv_cache.shape[1], kv_cache.shape[0])
    decode = _decode_torch if q.dtype == torch.float32 else _decode_triton
    decode(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal, out, lse)
    return out, lse


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool = True,
    head_dim_v: int = LATENT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA decode attention over a paged latent cache (FlashMLA's ``flash_mla_with_kvcache``).

    Args:
        q: ``[B, s_q, H, 576]`` (the absorbed query: 512 latent + 64 rope), bfloat16 / float16 / float32,
            contiguous; any head count.
        kv_cache: ``[num_blocks, page, 576]`` in q's dtype, page 16, 32 or 64; keys are whole rows, values their
            first 512 columns. block_table: ``[B, max_blocks] int32`` (physical block of each page, any order).
        cache_seqlens: ``[B] int32`` keys per sequence (pages past a sequence's length are never read).
        softmax_scale: the scale of q.k. causal: with s_q > 1, query i sees keys up to ``len - s_q + i``
            (bottom-right aligned, speculative decoding). head_dim_v: 512.

    Returns ``(out [B, s_q, H, 512] in q's dtype, lse [B, H, s_q] float32)``; rows with nothing to attend give
    out 0 and lse +inf. GPU (16-bit): Triton split-KV (8 splits per sequence, 64 (query, head) rows per
    program) and a combine; fp32 on a GPU: torch, all sequences at once; CPU: C++ (an online softmax over
    64-key blocks in fp32, OpenMP over sequences).
    """
    return _decode_op(q, kv_cache, block_table, cache_seqlens, float(softmax_scale), causal, head_dim_v)


def _dense_cpu(kv_cache, block_table, cache_seqlens, latents) -> bool:
    """The C++ append's inputs: CPU tensors, dense, int32 table and lengths (else the torch form runs)."""
    return (kv_cache.is_cpu and block_table.is_cpu and cache_seqlens.is_cpu and latents.is_cpu
            and block_table.dtype is _I32 and cache_seqlens.dtype is _I32 and block_table.dim() == 2
            and cache_seqlens.dim() == 1 and kv_cache.is_contiguous() and block_table.is_contiguous()
            and cache_seqlens.is_contiguous() and latents.is_contiguous())  # fmt: skip


def append_to_cache(
    kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor, latents: torch.Tensor
) -> torch.Tensor:
    """Write ``latents [B, s_new, 576]`` after each sequence's last key in the paged cache (in place) and return
    the new lengths ``cache_seqlens + s_new``. The pages must already be in ``block_table``. No host sync."""
    check_tensor("latents", latents, dtypes=(kv_cache.dtype,), ndim=3)
    B, s_new, width = latents.shape
    if width != kv_cache.shape[-1] or block_table.shape[0] != B or cache_seqlens.shape[0] != B:
        raise ValueError(f"latents must be [B, s_new, {kv_cache.shape[-1]}] with B = {block_table.shape[0]}, got "
                         f"{tuple(latents.shape)}")  # fmt: skip
    page = kv_cache.shape[1]
    if _dense_cpu(kv_cache, block_table, cache_seqlens, latents):  # one C++ pass: checks, then the copies
        new_lengths = torch.empty_like(cache_seqlens)
        status = ext().mla_append_cpu(kv_cache.data_ptr(), kv_cache.element_size(), block_table.data_ptr(),
                                      cache_seqlens.data_ptr(), latents.data_ptr(), new_lengths.data_ptr(), B, s_new,
                                      width, page, block_table.shape[1], kv_cache.shape[0])  # fmt: skip
        if int(status) != 0:  # not MlaDecodeStatus.ok: these name what is wrong
            check_lengths(cache_seqlens, block_table, page, kv_cache.shape[0])
            check_lengths(cache_seqlens + s_new, block_table, page, kv_cache.shape[0])
            raise AssertionError(f"mla_append_cpu reported {status} but the lengths pass the checks")
        return new_lengths
    new_lengths = cache_seqlens + s_new
    check_lengths(cache_seqlens, block_table, page, kv_cache.shape[0])  # negative lengths would index backwards
    check_lengths(new_lengths, block_table, page, kv_cache.shape[0])
    pos = cache_seqlens.long()[:, None] + torch.arange(s_new, device=latents.device)
    blocks = block_table.long().gather(1, pos // page)
    kv_cache[blocks.reshape(-1), (pos % page).reshape(-1)] = latents.reshape(-1, width)
    return new_lengths
