"""CPU path of the fused LM-head log-prob: PyTorch over (vocab tile x token chunk) blocks.

The loops run vocab tiles outermost, so each tile of the weight is prepared once (converted to fp32, or for
bf16 on a CPU with AMX packed for ``csrc/common/amx_bf16_gemm.cpp``, whose GEMM reads the bf16 values and
writes fp32 logits at ~5x the fp32 GEMM's rate) and its ``d weight`` rows are accumulated in fp32 once; a
token chunk's logits block is the only logits-shaped memory alive (``CPU_SCRATCH_BYTES``). Logits, log-sum-exp
and log-probs are fp32 for every input dtype.

For bf16 inputs the dtype of the two gradient GEMMs (``d hidden += d logits @ W``, ``d W += d logits^T @ hidden``)
follows the CPU the code runs on (``r1kernels.cpu_caps.fast_bf16_gemm``; ``R1K_CPU_BF16_GEMM=1|0`` forces it):
- native bf16 dot products through oneDNN (AVX512-BF16, AMX-BF16, Arm BF16): bf16 GEMMs on the bf16-rounded
  ``d logits``, as the GPU kernels do, each block's product added into the fp32 sums;
- otherwise fp32 GEMMs on the fp32 ``d logits`` and fp32 copies of the weight tile and the hidden chunk
  (a chunk-sized and a tile-sized buffer beside the bf16 form's memory). There bf16 GEMMs would be
  emulated, 30-60x slower (forward + backward at N=512, H=1024, V=32000 on an AVX2-only EPYC: 47 s, against
  1.5 s in fp32). This form skips both bf16 roundings and is the more accurate one.
The one-shot form for small problems runs its GEMMs in fp32 for every CPU.
"""

from __future__ import annotations

import torch

from r1kernels import cpu_caps
from r1kernels._checks import check_index_range
from r1kernels._ext import cpp_dtype, ext

VOCAB_TILE = 1024
CPU_SCRATCH_BYTES = 16 * 2**20  # one fp32 [rows, VOCAB_TILE] logits block
# Problems whose whole [N, V] fp32 logits fit in this many elements (256 KiB) take a one-shot path: at decode
# sizes the blocked loops' few dozen small torch ops cost more than the math.
SMALL_LOGITS = 1 << 16
# Up to this many multiply-adds (N x V x H) one C++ call does it all (csrc/grpo/lm_head_small.cpp).
TINY_MACS = 1 << 20


def tiny(N: int, V: int, H: int) -> bool:
    return N * V * H <= TINY_MACS


def blocked(N: int, V: int, H: int) -> bool:
    """Whether the blocked loops run (where rows can be left out: see ``_row_chunks``)."""
    return not tiny(N, V, H) and N * V > SMALL_LOGITS


def problem_fields(hidden, weight, bias, ids, inv_t: float, N: int, H: int, V: int) -> tuple:
    """LmHeadProblem's fields in order, for the extension's positional ``*_fast`` entries (building the struct
    through keywords costs more than the math at decode sizes); hidden [N, H], weight [V, H] as the caller read
    them."""
    stride_h, stride_w = hidden.stride()[0] if N > 1 else H, weight.stride()[0] if V > 1 else H  # stride(0) costs more
    return (hidden.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), cpp_dtype(hidden.dtype),
            ids.data_ptr(), N, V, H, stride_h, stride_w, inv_t)  # fmt: skip


def _forward_tiny(hidden, weight, bias, ids, inv_t: float, with_entropy: bool):
    (N, H), V = hidden.shape, weight.shape[0]
    logp, lse, entropy = torch.empty(N), torch.empty(N), torch.empty(N)  # op outputs never alias; all written
    if not ext().lm_head_logprobs_small_cpu_fast(*problem_fields(hidden, weight, bias, ids, inv_t, N, H, V),
                                                 with_entropy,
                                                 logp.data_ptr(), lse.data_ptr(), entropy.data_ptr()):  # fmt: skip
        check_index_range("token_ids", ids, weight.shape[0], "V")  # raises, naming the values
    return logp, lse, entropy


def _backward_tiny(g, ge, hidden, weight, bias, ids, lse, entropy, inv_t: float):
    """The kernel writes fp32 gradients: straight into the outputs for fp32 inputs, else into buffers that are
    then converted."""
    (N, H), V = hidden.shape, weight.shape[0]
    d_hidden, d_weight = torch.empty(N, H), torch.empty(V, H)
    d_bias = None if bias is None else torch.empty(V)
    ext().lm_head_logprobs_small_backward_cpu_fast(
        *problem_fields(hidden, weight, bias, ids, inv_t, N, H, V), g.data_ptr(), 0 if ge is None else ge.data_ptr(),
        lse.data_ptr(), entropy.data_ptr(), d_hidden.data_ptr(), d_weight.data_ptr(),
        0 if d_bias is None else d_bias.data_ptr(),
    )  # fmt: skip
    if hidden.dtype is torch.float32:
        return d_hidden, d_weight, d_bias
    return d_hidden.to(hidden.dtype), d_weight.to(weight.dtype), None if bias is None else d_bias.to(bias.dtype)


def _blocks(N: int, V: int) -> tuple[int, int]:
    """(vocab tile, token rows per block): a block within CPU_SCRATCH_BYTES and within an eighth of the whole
    logits, so small problems also keep a small footprint; never under 64 rows (GEMM efficiency)."""
    vt = min(V, VOCAB_TILE)
    rows = min(CPU_SCRATCH_BYTES // (4 * vt), -(-N // 8))
    return vt, max(1, min(N, max(rows, 64)))


def _logits(h32, w32, b32, inv_t, out=None):
    z = torch.mm(h32, w32.T, out=out) if b32 is None else torch.addmm(b32, h32, w32.T, out=out)
    return z if inv_t == 1.0 else z.mul_(inv_t)


def _scratch(rows: int, vt: int):
    """``block(r, cols)``: a dense fp32 [r, cols] view of one buffer of rows x vt floats, for the chunk-sized
    temporaries of the blocked loops (one allocation for the whole call instead of one per block: the
    allocator's churn over 2 MiB blocks showed as resident memory and time)."""
    buf = torch.empty(rows * vt)
    return lambda r, cols: buf[: r * cols].view(r, cols)


def _float(t):
    return None if t is None else t.float()


def _tile_logits(w: torch.Tensor, b: torch.Tensor | None, inv_t: float, block):
    """``logits(h) = (h @ w.T + b) * inv_t`` in fp32 for the vocab tile ``w [vt, H]``, as a function of a token
    chunk ``h`` (written into ``block(rows, vt)``, see ``_scratch``), and the tile's fp32 copy (None when not
    made). bf16 on AMX: the tile is packed once for every chunk and the GEMM reads the bf16 values (same
    products, fp32 sums); otherwise the fp32 copy is the operand."""
    b32 = _float(b)
    vt = w.shape[0]
    if w.dtype is not torch.bfloat16 or not cpu_caps.amx_bf16():
        w32 = w.float()
        return (lambda h: _logits(h.float(), w32, b32, inv_t, out=block(h.shape[0], vt))), w32
    H, lib = w.shape[1], ext()
    packed = torch.empty(lib.amx_packed_b_words(n=vt, k=H), dtype=torch.int32)
    lib.amx_pack_b_nt(b=w.data_ptr(), ldb=w.stride(0) if vt > 1 else H, n=vt, k=H, packed=packed.data_ptr())

    def logits(h: torch.Tensor) -> torch.Tensor:
        z = block(h.shape[0], vt)
        lib.amx_bf16_gemm_nt(a=h.data_ptr(), lda=h.stride(0) if h.shape[0] > 1 else H, m=h.shape[0],
                             packed_b=packed.data_ptr(), n=vt, k=H, bias=0 if b32 is None else b32.data_ptr(),
                             alpha=inv_t, c=z.data_ptr(), ldc=vt)  # fmt: skip
        return z

    return logits, None


def _forward_small(hidden, weight, bias, ids, inv_t: float, with_entropy: bool):
    z = _logits(hidden.float(), weight.float(), _float(bias), inv_t)
    log_p = torch.log_softmax(z, dim=1)  # one fused op; torch.logsumexp is several times slower at this size
    logp = log_p.gather(1, ids[:, None]).squeeze(1)
    # lse at the max logit, where |log p| <= log V: as exact as the max-shifted sum of the blocked path
    z_max, at_max = z.max(dim=1, keepdim=True)
    lse = z_max.sub_(log_p.gather(1, at_max)).squeeze(1)
    if not with_entropy:
        return logp, lse, torch.zeros_like(lse)
    return logp, lse, (log_p.exp() * log_p).sum(dim=1).neg_()


def _backward_small(g, ge, hidden, weight, bias, ids, entropy, inv_t: float):
    h32, w32 = hidden.float(), weight.float()
    log_p = torch.log_softmax(_logits(h32, w32, _float(bias), inv_t), dim=1)
    p = log_p.exp()
    gz = p * -g[:, None]
    col = ids[:, None]
    gz.scatter_(1, col, torch.expm1(log_p.gather(1, col)).mul_(-g[:, None]))  # 1 - p at the target, exactly
    if ge is not None:
        gz.sub_(log_p.add_(entropy[:, None]).mul_(p).mul_(ge[:, None]))
    if inv_t != 1.0:
        gz.mul_(inv_t)
    d_bias = None if bias is None else gz.sum(dim=0).to(bias.dtype)
    return (gz @ w32).to(hidden.dtype), (gz.T @ h32).to(weight.dtype), d_bias


def _targets_in_tile(ids: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns within the tile) of the tokens whose target id falls in vocab tile [v0, v1)."""
    rows = torch.nonzero((ids >= v0) & (ids < v1)).squeeze(1)
    return rows, ids[rows] - v0


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a dense fp32 tensor; itself when it is one already (cheaper than ``.float().contiguous()``)."""
    return t if t.dtype is torch.float32 and t.is_contiguous() else t.float().contiguous()


def ids_int64(token_ids: torch.Tensor) -> torch.Tensor:
    return token_ids if token_ids.dtype is torch.int64 and token_ids.is_contiguous() else token_ids.long().contiguous()


def forward(hidden, weight, bias, token_ids, temperature: float, with_entropy: bool, skip=None):
    """(logp, lse, entropy) [N] fp32. ``skip``: optional [N] bool, rows whose results are not wanted: the blocked
    path leaves their runs out (``_row_chunks``), and their results are then not values (lse -inf, by which the
    backward knows to leave them out too); the caller overwrites them."""
    (N, H), V = hidden.shape, weight.shape[0]
    inv_t = 1.0 / temperature
    ids = ids_int64(token_ids)
    if tiny(N, V, H):
        return _forward_tiny(hidden, weight, bias, ids, inv_t, with_entropy)
    check_index_range("token_ids", ids, V, "V")
    if N * V <= SMALL_LOGITS:
        return _forward_small(hidden, weight, bias, ids, inv_t, with_entropy)
    vt, rows = _blocks(N, V)
    chunks = _row_chunks(skip, rows) if skip is not None else [(r0, min(N, r0 + rows)) for r0 in range(0, N, rows)]
    m = torch.full((N,), float("-inf"))
    s, zy, t = torch.zeros(N), torch.zeros(N), torch.zeros(N)
    z_block, p_block = _scratch(rows, vt), _scratch(rows, vt)
    for v0 in range(0, V, vt):
        v1 = min(V, v0 + vt)
        logits, _ = _tile_logits(weight[v0:v1], None if bias is None else bias[v0:v1], inv_t, z_block)
        for r0, r1 in chunks:
            z = logits(hidden[r0:r1])
            hit, col = _targets_in_tile(ids[r0:r1], v0, v1)
            zy[r0:r1][hit] = z[hit, col]
            m_new = torch.maximum(m[r0:r1], z.amax(dim=1))
            alpha = torch.exp(m[r0:r1] - m_new)
            zc = z.sub_(m_new[:, None])  # z - m_new, in place (zy was read above)
            p = torch.exp(zc, out=p_block(*zc.shape))
            if with_entropy:
                # t = sum p (z - m) relative to the running max (see kernels.logprob_fwd_kernel): no cancellation
                shift = torch.where(s[r0:r1] > 0, m[r0:r1] - m_new, 0.0) * s[r0:r1]
                t[r0:r1] = (t[r0:r1] + shift) * alpha + zc.mul_(p).sum(dim=1)
            s[r0:r1] = s[r0:r1] * alpha + p.sum(dim=1)
            m[r0:r1] = m_new
    lse = m + torch.log(s)
    entropy = torch.log(s) - t / s if with_entropy else torch.zeros(N)
    return zy - lse, lse, entropy


# The blocked loops skip rows that need no work (in the backward: incoming gradients exactly zero; in the
# forward: rows the caller marks, the fused loss's zero-weight tokens; a GRPO batch's right padding, ~25% of the
# tokens at uniform completion lengths, each worth 2 x H x V multiply-adds forward and 6 x H x V backward) when
# at least this share of the rows can be skipped and the rows that need work form runs of RUN_ROWS or more on
# average: each run is multiplied in place (views, no gathered copy: the memory stays what it was), and short
# runs would make the GEMMs inefficient.
SKIP_ZERO_ROWS = 1 / 16
RUN_ROWS = 64


def _row_chunks(skip: torch.Tensor, rows: int, force: bool = False) -> list[tuple[int, int]]:
    """(first, end) row chunks of at most ``rows`` rows covering every row not marked in ``skip`` ([N] bool);
    all rows when skipping does not pay, unless ``force``."""
    N, n_skip = skip.shape[0], int(skip.sum())
    runs = [(0, N)]
    if n_skip == N:
        runs = []
    elif n_skip and (force or n_skip >= SKIP_ZERO_ROWS * N):
        active, pad = (~skip).to(torch.int8), torch.zeros(1, dtype=torch.int8)
        edges = torch.nonzero(torch.diff(active, prepend=pad, append=pad)).squeeze(1).tolist()  # start, end, ...
        if force or N - n_skip >= RUN_ROWS * (len(edges) // 2):
            runs = list(zip(edges[::2], edges[1::2], strict=True))
    return [(r0, min(end, r0 + rows)) for start, end in runs for r0 in range(start, end, rows)]


def _zero_gradient(g: torch.Tensor, ge: torch.Tensor | None) -> torch.Tensor:
    """Rows whose gradients w.r.t. log-prob and entropy are exactly zero (NaN is not)."""
    return g == 0 if ge is None else (g == 0) & (ge == 0)


def backward(grad_logp, grad_entropy, hidden, weight, bias, token_ids, lse, entropy, temperature: float):
    """Gradients of ``sum(grad_logp * logp + grad_entropy * entropy)``; ``grad_entropy`` may be None. Rows whose
    incoming gradients are exactly zero (masked tokens) are skipped when enough are, in runs (``_row_chunks``;
    decode-sized problems, one C++ call: every such row): their d hidden is 0 and they add nothing to d weight,
    also when their hidden state holds NaN (the forward's log-prob and the loss carry that NaN)."""
    N, H = hidden.shape
    V = weight.shape[0]
    inv_t = 1.0 / temperature
    ids = ids_int64(token_ids)
    g = _f32(grad_logp)
    ge = None if grad_entropy is None else _f32(grad_entropy)
    if tiny(N, V, H):
        return _backward_tiny(g, ge, hidden, weight, bias, ids, _f32(lse), _f32(entropy), inv_t)
    if N * V <= SMALL_LOGITS:
        return _backward_small(g, ge, hidden, weight, bias, ids, entropy, inv_t)
    vt, rows = _blocks(N, V)
    # rows without gradient are skipped: their d hidden stays 0. Rows the forward left out (skip: lse -inf) must
    # be: recomputed, their probabilities would be exp(+inf)
    zero = _zero_gradient(g, ge)
    chunks = _row_chunks(zero, rows, force=bool((zero & (lse == float("-inf"))).any()))
    gemm_in_bf16 = hidden.dtype == torch.bfloat16 and cpu_caps.fast_bf16_gemm()
    d_hidden32 = torch.zeros((N, H))
    d_weight = torch.empty_like(weight)
    d_bias32 = None if bias is None else torch.zeros(V)
    z_block, p_block = _scratch(rows, vt), None if ge is None else _scratch(rows, vt)
    for v0 in range(0, V, vt):
        v1 = min(V, v0 + vt)
        w = weight[v0:v1]
        logits, w32 = _tile_logits(w, None if bias is None else bias[v0:v1], inv_t, z_block)
        if w32 is None and not gemm_in_bf16:  # the gradient GEMMs still take the fp32 copies
            w32 = w.float()
        # fp32 weights accumulate straight into their gradient; others into an fp32 tile
        d_w32 = d_weight[v0:v1].zero_() if weight.dtype == torch.float32 else torch.zeros((v1 - v0, H))
        for r0, r1 in chunks:
            h = hidden[r0:r1]
            log_p = logits(h).sub_(lse[r0:r1, None])
            hit, col = _targets_in_tile(ids[r0:r1], v0, v1)
            # g * (onehot - softmax); at the target 1 - p is -expm1(logp), exact even when p -> 1
            target = -torch.expm1(log_p[hit, col]) * g[r0:r1][hit]
            # without an entropy gradient log p is not needed past this point: exp in place (one block less)
            p = log_p.exp_() if ge is None else torch.exp(log_p, out=p_block(*log_p.shape))
            if ge is not None:  # entropy E = -sum p log p: d E / d z_k = -p_k (log p_k + E)
                entropy_term = log_p.add_(entropy[r0:r1, None]).mul_(p).mul_(ge[r0:r1, None])
            gz = p.mul_(-g[r0:r1, None])
            gz[hit, col] = target
            if ge is not None:
                gz.sub_(entropy_term)
            gz.mul_(inv_t)
            if d_bias32 is not None:
                d_bias32[v0:v1] += gz.sum(dim=0)
            if gemm_in_bf16:
                gz16 = gz.to(torch.bfloat16)
                d_hidden32[r0:r1] += gz16 @ w
                d_w32 += gz16.T @ h
            else:
                d_hidden32[r0:r1].addmm_(gz, w32)
                d_w32.addmm_(gz.T, _f32(h))
        if d_w32.data_ptr() != d_weight[v0:v1].data_ptr():
            d_weight[v0:v1] = d_w32
    d_bias = None if d_bias32 is None else d_bias32.to(bias.dtype)
    return d_hidden32.to(hidden.dtype), d_weight, d_bias
