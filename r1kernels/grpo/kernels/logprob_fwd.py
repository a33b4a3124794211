"""Forward of the fused LM-head log-prob: per token and vocab chunk, the online log-sum-exp state.

Logits are formed one ``[BLOCK_N, BLOCK_V]`` tile at a time and never stored. Per token, over one vocab
chunk: the running max m, the sum of exp(z - m), the target logit and, optionally, sum(exp(z - m) (z - m))
for the entropy. The launcher combines the per-chunk partials (O(tokens x chunks)).
"""

from __future__ import annotations

import itertools

import triton
import triton.language as tl

from r1kernels._checks import cdiv
from r1kernels._launch import KernelConfig
from r1kernels.compile_registry import register, variant
from r1kernels.grpo.kernels.logits_tile import DTYPE_CASES, case_tag, logits_tile, operand_sources
from r1kernels.shared.kernels.program_order import grouped_tile

MAX_V_CHUNK = 8192  # vocab columns per program at most: ~19 chunks at V = 151936
MIN_V_CHUNK = 1024  # at least: below that, the partials and their combine stop being negligible
WAVES = 4  # programs per SM the grid aims for, so the last wave's tail is a small fraction


def vocab_chunk(n_tokens: int, vocab: int, sms: int, cfg: KernelConfig) -> int:
    """Vocab columns per program: the largest chunk (a multiple of BLOCK_V, at most MAX_V_CHUNK) whose grid is
    still WAVES programs per SM. Few tokens (N = 512: 4 token blocks) get small chunks so the GPU fills
    (4 x 132 programs instead of 4 x 19); many tokens keep MAX_V_CHUNK. A runtime argument: no recompile."""
    block_v = cfg["BLOCK_V"]
    chunks = cdiv(WAVES * sms, cdiv(n_tokens, cfg["BLOCK_N"]))
    chunk = cdiv(cdiv(vocab, chunks), block_v) * block_v
    return max(min(chunk, MAX_V_CHUNK), min(MIN_V_CHUNK, cdiv(vocab, block_v) * block_v))


@triton.jit
def logprob_fwd_kernel(
    h_ptr,  # [N, H] hidden, row stride stride_h
    w_ptr,  # [V, H] LM-head weight, row stride stride_w
    b_ptr,  # [V] bias (unused unless HAS_BIAS)
    y_ptr,  # [N] int64 target token ids, all in [0, V)
    part_ptr,  # [4, NUM_CHUNKS, N] fp32 partials: max m, sum exp(z - m), target logit, sum exp(z - m)(z - m)
    z_ptr,  # [N, V] fp32 out, row stride stride_z: the logits themselves (written only when STORE_LOGITS)
    N, V, H, stride_h, stride_w, inv_t, V_CHUNK, stride_z,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, STORE_LOGITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    num_chunks = tl.cdiv(V, V_CHUNK)
    # grouped order: a resident wave holds GROUP_N token blocks x ~waves/GROUP_N vocab chunks, so its hidden
    # blocks stay in L2 across the chunk's vocab tiles and each weight tile serves GROUP_N programs
    block, chunk = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_chunks, GROUP_N)
    rows = block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    h_src, w_src = operand_sources(h_ptr, w_ptr, N, V, H, stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_H, USE_TMA)
    y = tl.load(y_ptr + rows, mask=rows < N, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    v_start = chunk.to(tl.int64) * V_CHUNK
    v_end = tl.minimum(v_start + V_CHUNK, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = logits_tile(h_src, w_src, b_ptr, rows, cols, block * BLOCK_N, tl.cast(v0, tl.int32), N, V, H, stride_h,
                        stride_w, inv_t, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, USE_TMA)  # fmt: skip
        z = tl.where(cols[None, :] < v_end, z, float("-inf"))
        if STORE_LOGITS:  # the single-pass training path keeps them for its gradient (no recompute)
            tl.store(z_ptr + rows[:, None] * stride_z + cols[None, :], z,
                     mask=(rows[:, None] < N) & (cols[None, :] < v_end))  # fmt: skip
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        if WITH_ENTROPY:
            # t = sum exp(z - m) * (z - m), relative to the running max so that large logits do not cancel in
            # entropy = log(s) - t / s; moving the max from m to m_new adds (m - m_new) * s before rescaling.
            # Masked columns have p = 0 and z = -inf: take z - m_new = 0 there so 0 * (-inf) is not NaN.
            shift = tl.where(s > 0, m - m_new, 0.0) * s  # s = 0 while m = -inf: no shift (and no inf * 0)
            zc = tl.where(cols[None, :] < v_end, z - m_new[:, None], 0.0)
            t = (t + shift) * alpha + tl.sum(p * zc, axis=1)
        s = s * alpha + tl.sum(p, axis=1)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m = m_new
    base = part_ptr + chunk.to(tl.int64) * N + rows
    plane = num_chunks.to(tl.int64) * N
    ok = rows < N
    tl.store(base, m, mask=ok)
    tl.store(base + plane, s, mask=ok)
    tl.store(base + 2 * plane, zy, mask=ok)
    tl.store(base + 3 * plane, t, mask=ok)


def config(dtype_bytes: int, arch: int | None, precision: str, store: bool = False) -> KernelConfig:
    """16-bit inputs: 128 x 128 logits tiles (HGMMA.64x128x16 on sm_90a, HMMA on sm_80 / sm_89) over 8 warps;
    beside the tile the forward keeps four running statistics per row, which puts it at 255 registers with no
    stack (the compile report checks it). Storing the logits too (``store``, the single-pass training path)
    needs the tile in a store layout as well: 128 x 64 there. fp32 inputs take smaller tiles."""
    if dtype_bytes == 4 and precision == "ieee":
        # full-precision fp32 dots hold their operands in registers (no tensor cores): a 32-row tile over
        # 8 warps stays off the stack
        tiles = (32, 64, 16) if store else (32, 64, 32)
        return KernelConfig({"BLOCK_N": tiles[0], "BLOCK_V": tiles[1], "BLOCK_H": tiles[2], "GROUP_N": 8}, num_warps=8)
    if dtype_bytes == 4:
        return KernelConfig({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32, "GROUP_N": 8}, num_warps=4)
    return KernelConfig({"BLOCK_N": 128, "BLOCK_V": 64 if store else 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8)


@register
def variants(arch: int):
    out = []
    for (tl_type, nbytes, precision), store in itertools.product(DTYPE_CASES, (False, True)):
        tag, kind = case_tag(tl_type, nbytes, precision)
        # TMA where the launcher may choose it (sm_90a, 16-bit), the pointer loads always (unaligned inputs)
        for tma in (False, True) if arch >= 90 and nbytes == 2 else (False,):
            out.append(variant(
                f"grpo.logprob_fwd[{tag}{',store' if store else ''}{',tma' if tma else ''}]", logprob_fwd_kernel,
                config(nbytes, arch, precision, store), kind=kind,
                types={"h_ptr": f"*{tl_type}", "w_ptr": f"*{tl_type}", "b_ptr": f"*{tl_type}", "y_ptr": "*i64",
                       "part_ptr": "*fp32", "z_ptr": "*fp32", "inv_t": "fp32"},
                switches={"HAS_BIAS": False, "WITH_ENTROPY": True, "STORE_LOGITS": store, "PRECISION": precision,
                          "USE_TMA": tma},
                aligned=("h_ptr", "w_ptr", "z_ptr", "H", "stride_h", "stride_w", "stride_z"),
            ))  # fmt: skip
    return out
