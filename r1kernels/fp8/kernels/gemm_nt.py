"""Block-scaled FP8 GEMM, DeepGEMM's NT layout: D[M, N] = (A * sa) @ (B * sb).T (+ C).

A [M, K] e4m3 with one fp32 scale per 1 x 128 group, B [N, K] e4m3 with one per 128 x 128 block. Each 128-wide
K block's MMA result lands in a fresh fp32 accumulator and is scaled (sa of the row x sb of the block) into
the running fp32 sum: DeepSeek-V3's promotion, which also sidesteps Hopper's reduced-precision FP8 MMA
accumulation over long K. sm_89 / sm_90a multiply e4m3 on the tensor cores (QGMMA on sm_90a); sm_80 has no
FP8 MMA (nor an fp8 type in Triton), so it turns the codes into fp16 with two integer ops (exact, scaled by
2^-8) and runs fp16 MMA: the same API and memory savings, 16-bit math.
"""

from __future__ import annotations

import itertools

import triton
import triton.language as tl

from r1kernels._launch import KernelConfig
from r1kernels.compile_registry import register, variant
from r1kernels.fp8.kernels.e4m3 import hw_fp8_convert
from r1kernels.shared.kernels.program_order import grouped_tile

SCALE_BLOCK = 128  # K per scale (both operands) and N rows per weight scale: the tile edges below


@triton.jit
def e4m3_as_fp16(q):
    """e4m3 codes (uint8) -> fp16 of value * 2^-8, exactly: shifting the 7 magnitude bits up by 7 turns e4m3's
    4-bit exponent (bias 7) and 3-bit mantissa into fp16's fields (bias 15), subnormals included. Two integer
    ops per element, where a full decode to fp32 and back blows the sm_80 register file."""
    c = q.to(tl.int16)
    return (((c & 0x7F) << 7) | ((c & 0x80) << 8)).to(tl.float16, bitcast=True)


@triton.jit
def gemm_nt_kernel(
    a_ptr,  # [M, K] e4m3 (uint8 view without FP8_MMA), row stride stride_a
    b_ptr,  # [N, K] e4m3 (uint8 view without FP8_MMA), row stride stride_b
    sa_ptr,  # [M, ceil(K/128)] fp32, strides (stride_sam, stride_sak): row-major or M-major
    sb_ptr,  # [ceil(N/128), ceil(K/128)] fp32, strides (stride_sbn, stride_sbk); B_ROW_SCALES: [N, ceil(K/128)]
    c_ptr,  # [M, N] added to the product (read only when HAS_C), row stride stride_cm
    d_ptr,  # [M, N] out (bf16 / fp32), row stride stride_dm
    ids_ptr,  # GROUPED: [M] int32 expert of each row, -1 on padding; MASKED: [G] int32 valid rows per group;
    # K_GROUPED: [G, 2] int32 K range (start, end) of each group, multiples of 128 (the last may end at K)
    # G: groups of work items (MASKED, K_GROUPED; else 1); B_GROUPS: weight matrices stacked in b (GROUPED, MASKED)
    G, B_GROUPS, M, N, K, stride_a, stride_b, stride_sam, stride_sak, stride_sbn, stride_sbk, stride_cm, stride_dm,
    stride_bg, stride_sbg,  # GROUPED / MASKED: elements from one expert's b / b_scales to the next
    stride_ag, stride_sag, stride_dg,  # MASKED: the same for a, a_scales and d (M is then rows per group);
    # K_GROUPED: stride_dg is the output's (and c's) group stride
    HAS_C: tl.constexpr, FP8_MMA: tl.constexpr, USE_TMA: tl.constexpr, GROUPED: tl.constexpr,
    MASKED: tl.constexpr, K_GROUPED: tl.constexpr, B_ROW_SCALES: tl.constexpr, PERSISTENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Work items are (group, tile): G groups of tiles_m x tiles_n tiles (G is 1 for dense and contiguous-grouped).
    # PERSISTENT (the grouped layouts): each program walks items pid, pid + programs, ..., so the grid is sized
    # to the machine, not to the worst-case group, and a padding tile or a masked group's empty tiles cost a
    # few instructions instead of a program. Otherwise one item per program: the loop runs once, and nothing is
    # hoisted out of it (a persistent loop keeps index tensors live across the K loop: +50-80 registers).
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tiles_m * tiles_n
    if USE_TMA:  # sm_90a: one descriptor per operand for the whole launch (groups stacked as rows; a tile
        # that runs past its group reads the next group's rows, whose products land only in masked outputs)
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M * (G if MASKED else 1), K], strides=[stride_a, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])  # fmt: skip
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N * B_GROUPS, K],
                                           strides=[stride_b, 1], block_shape=[BLOCK_N, BLOCK_K])  # fmt: skip
    if PERSISTENT:
        last, step = G * tiles, tl.num_programs(0)
    else:
        last, step = tl.program_id(0) + 1, 1
    for work in tl.range(tl.program_id(0), last, step):
        group = (work // tiles).to(tl.int64)
        pid_m, pid_n = grouped_tile(work % tiles, tiles_m, tiles_n, GROUP_M)
        k_begin = 0
        first_block = 0  # k_begin // 128 as int64: the scale pointers' starting offset
        k_end = K
        rows = M  # rows that hold data (a group's masked_m in the masked layout)
        a_row0 = pid_m * BLOCK_M  # the tile's first row in the descriptors' stacked views
        b_row0 = pid_n * BLOCK_N
        a_g, sa_g, d_g, c_g, b_g, sb_g = a_ptr, sa_ptr, d_ptr, c_ptr, b_ptr, sb_ptr
        rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        if K_GROUPED:  # the weight-gradient layout: group g sums over its own token range, into its own output
            k_begin = tl.multiple_of(tl.load(ids_ptr + 2 * group), BLOCK_K)  # keeps the loads 16-byte vectors
            k_end = tl.multiple_of(tl.load(ids_ptr + 2 * group + 1), 16)  # the masks stay constant per vector
            first_block = k_begin.to(tl.int64) // BLOCK_K
            d_g += group * stride_dg
            c_g += group * stride_dg
        if MASKED:  # DeepGEMM's masked layout: group g's first masked_m[g] of M rows; the rest are written as 0
            rows = tl.minimum(tl.load(ids_ptr + group), M)
            k_end = tl.where(pid_m * BLOCK_M < rows, K, 0)  # a tile past the group's rows skips its K loop
            a_g += group * stride_ag
            sa_g += group * stride_sag
            d_g += group * stride_dg
            b_g += group * stride_bg
            sb_g += group * stride_sbg
            a_row0 += (group * M).to(tl.int32)
            b_row0 += (group * N).to(tl.int32)
        if GROUPED:  # DeepGEMM's contiguous layout: a tile's rows are one expert's or padding (-1, output 0)
            row_ids = tl.load(ids_ptr + rm, mask=rm < M, other=-1)
            expert = tl.maximum(tl.max(row_ids, axis=0), 0)
            k_end = tl.where(tl.max(row_ids, axis=0) >= 0, K, 0)  # an all-padding tile skips its K loop
            b_g += expert.to(tl.int64) * stride_bg
            sb_g += expert.to(tl.int64) * stride_sbg
            b_row0 += expert * N
        rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_g + rm[:, None] * stride_a + (k_begin + rk)[None, :]
        b_ptrs = b_g + rn[:, None] * stride_b + (k_begin + rk)[None, :]
        # scales advance by one K block per step (pointer adds: no 32-bit K-block index x stride product)
        sa_ptrs = sa_g + rm * stride_sam + first_block * stride_sak
        if B_ROW_SCALES:  # 1 x 128 scales on both operands (the weight gradient's 128 x 1 token tiles)
            sb_ptrs = sb_g + rn * stride_sbn + first_block * stride_sbk
        else:  # BLOCK_N == 128: one weight scale per K block
            sb_ptrs = sb_g + pid_n.to(tl.int64) * stride_sbn + first_block * stride_sbk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(k_begin, k_end, BLOCK_K):
            if USE_TMA:
                a = a_desc.load([a_row0, k0])
                b = b_desc.load([b_row0, k0])
            else:
                a = tl.load(a_ptrs, mask=(rm[:, None] < rows) & (rk[None, :] < k_end - k0), other=0.0)
                b = tl.load(b_ptrs, mask=(rn[:, None] < N) & (rk[None, :] < k_end - k0), other=0.0)
            if FP8_MMA:
                part = tl.dot(a, tl.trans(b))  # a fresh fp32 accumulator per K block: the promotion
            else:
                part = tl.dot(e4m3_as_fp16(a), tl.trans(e4m3_as_fp16(b))) * 65536.0  # undo the two 2^-8
            sa = tl.load(sa_ptrs, mask=rm < rows, other=0.0)
            if B_ROW_SCALES:
                sb = tl.load(sb_ptrs, mask=rn < N, other=0.0)
                acc += (part * sa[:, None]) * sb[None, :]
            else:
                acc += part * (sa[:, None] * tl.load(sb_ptrs))
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
            sa_ptrs += stride_sak
            sb_ptrs += stride_sbk
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        if GROUPED:
            acc = tl.where(row_ids[:, None] >= 0, acc, 0.0)
        if MASKED:  # rows past masked_m: 0 (the TMA path loaded whatever they hold)
            acc = tl.where(rm[:, None] < rows, acc, 0.0)
        if HAS_C:
            acc += tl.load(c_g + rm[:, None] * stride_cm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(d_g + rm[:, None] * stride_dm + rn[None, :], acc.to(d_ptr.dtype.element_ty), mask=mask)


def use_tma(arch: int | None, fp8_mma: bool, *operands) -> bool:
    """Operands through tensor descriptors on sm_90a (FP8 codes; base addresses 16-byte aligned, row strides
    are by validation; stacked groups dense, since one descriptor spans them); cp.async pointer loads
    elsewhere."""

    def stacked(t):
        return t.dim() == 2 or t.stride(0) == t.shape[1] * t.stride(1)

    return arch is not None and arch >= 90 and fp8_mma and all(t.data_ptr() % 16 == 0 and stacked(t)
                                                                for t in operands)  # fmt: skip


SHARED_PER_SM = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def resident_programs(cfg: KernelConfig, arch: int | None) -> int:
    """Programs of this config one SM holds at once (the persistent grid is this many per SM): by shared
    memory (the operand stages) and by registers (counted at 255 per thread, the kernels' worst case)."""
    stage = (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"]
    by_smem = SHARED_PER_SM.get(arch if arch in SHARED_PER_SM else 90) // (stage * cfg.num_stages)
    by_regs = 65536 // (cfg.num_warps * 32 * 255)
    return max(1, min(by_smem, by_regs))


def config(M: int, arch: int | None, tma: bool = False, b_row_scales: bool = False) -> KernelConfig:
    """N and K tiles are the 128-wide scale blocks. sm_90a with TMA: 128 rows over two warpgroups (64 for
    decode-sized M), four 32 KB fp8 stages (227 KB shared); without TMA (unaligned base addresses, a
    fallback) one warpgroup of 64 rows: the cp.async address tensors on top of the persistent loop's state
    spilled at 128 rows. sm_80 / sm_89 keep the MMA result and the scaled running sum in registers side by
    side: 64 rows over 8 warps stay under 255 registers with no stack (128 rows spill), four stages fit
    sm_89's 99 KB. With b's 1 x 128 row scales (the weight gradient) each thread also holds a scale per
    column of its tile: on sm_90a the N tile halves to 64 (128 x 128 spills 32-200 bytes)."""
    block_n = SCALE_BLOCK
    if arch is not None and arch >= 90:
        block_m, warps = (128, 8) if M > 64 and tma else (64, 4)
        block_n = 64 if b_row_scales and block_m == 128 else block_n
    else:
        block_m, warps = 64, 8
    return KernelConfig({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": SCALE_BLOCK, "GROUP_M": 8},
                        num_warps=warps, num_stages=4)  # fmt: skip


@register
def variants(arch: int):
    fp8 = hw_fp8_convert(arch)
    codes = "*fp8e4nv" if fp8 else "*u8"
    out = []
    # (M, out dtype, + c, layout): dense, + c, contiguous-grouped, masked-grouped, the weight gradient (fp32 out,
    # 1 x 128 scales on both operands; + c for gradient accumulation) and its per-expert k-grouped form;
    # decode-sized M on sm_90a
    shapes = [
        (4096, "bf16", False, ""),
        (4096, "fp32", True, ""),
        (4096, "bf16", False, "grouped"),
        (4096, "bf16", False, "masked"),
        (4096, "fp32", True, "wgrad"),
        (4096, "fp32", False, "k_grouped"),
    ]
    shapes += [(64, "bf16", False, ""), (64, "fp32", False, "wgrad")] if arch >= 90 else []
    for (M, out_type, has_c, layout), tma in itertools.product(shapes, (False, True) if arch >= 90 else (False,)):
        tag = f"{'small-M' if M <= 64 else 'M'}->{out_type}{',+c' if has_c else ''}{',' + layout if layout else ''}"
        out.append(variant(
            f"fp8.gemm_nt[{tag}{',tma' if tma else ''}]", gemm_nt_kernel,
            config(M, arch, tma, b_row_scales=layout in ("wgrad", "k_grouped")), kind="matrix",
            types={"a_ptr": codes, "b_ptr": codes, "sa_ptr": "*fp32", "sb_ptr": "*fp32", "c_ptr": f"*{out_type}",
                   "d_ptr": f"*{out_type}", "ids_ptr": "*i32"},
            switches={"HAS_C": has_c, "FP8_MMA": fp8, "USE_TMA": tma, "GROUPED": layout == "grouped",
                      "MASKED": layout == "masked", "K_GROUPED": layout == "k_grouped",
                      "B_ROW_SCALES": layout in ("wgrad", "k_grouped"), "PERSISTENT": layout in ("grouped", "masked")},
            aligned=("a_ptr", "b_ptr", "c_ptr", "d_ptr", "K", "stride_a", "stride_b", "stride_cm", "stride_dm",
                     "stride_bg", "stride_ag"),
        ))  # fmt: skip
    return out
