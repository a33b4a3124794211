"""Triton kernels of the fused LM-head log-prob: logits are formed one [BLOCK_N, BLOCK_V] tile at a time
and never stored whole.

- ``logprob_fwd_kernel``: per token, over one vocab chunk, the online log-sum-exp state (running max m,
  sum of exp s), the target logit and, optionally, sum(exp(z - m) * (z - m)) for the entropy. Programs are
  ordered chunk-major so the programs resident at once read the same weight rows (L2 reuse); the
  launcher combines the per-chunk partials (O(tokens x chunks)).
- ``logprob_grad_logits_kernel``: recomputes a logits tile and writes d loss / d logits
  (``g / T * (onehot - softmax)``, plus the entropy term when asked) for one block into a bounded scratch.
- ``matmul_kernel``: C (+)= A @ B with fp32 accumulation; gives d hidden = G @ W and d weight += G^T @ H.

Runtime values (N, V, H, 1/temperature) are kernel arguments, never constexpr.
"""

from __future__ import annotations

import triton
import triton.language as tl

from r1kernels.compile_registry import KernelVariant, register


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_h, stride_w, inv_t,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """z[BLOCK_N, BLOCK_V] = (hidden[rows] @ weight[cols].T + bias[cols]) / T in fp32; -inf past V."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    k = tl.arange(0, BLOCK_H)
    for h0 in tl.range(0, H, BLOCK_H, num_stages=3):
        kh = h0 + k
        a = tl.load(h_ptr + rows[:, None] * stride_h + kh[None, :], mask=(rows[:, None] < N) & (kh[None, :] < H),
                    other=0.0)  # fmt: skip
        b = tl.load(w_ptr + cols[:, None] * stride_w + kh[None, :], mask=(cols[:, None] < V) & (kh[None, :] < H),
                    other=0.0)  # fmt: skip
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    z = acc * inv_t
    return tl.where(cols[None, :] < V, z, float("-inf"))


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation near 0 (a cubic Taylor term below |x| = 1e-2, relative error < 1e-8)."""
    small = x * (1.0 + x * (0.5 + x * (1.0 / 6.0)))
    return tl.where(tl.abs(x) < 1e-2, small, tl.exp(x) - 1.0)


@triton.jit
def logprob_fwd_kernel(
    h_ptr,  # [N, H] hidden, row stride stride_h
    w_ptr,  # [V, H] LM-head weight, row stride stride_w
    b_ptr,  # [V] bias (unused unless HAS_BIAS)
    y_ptr,  # [N] int64 target token ids, all in [0, V)
    part_ptr,  # [4, NUM_CHUNKS, N] fp32 partials: max m, sum exp(z - m), target logit, sum exp(z - m)(z - m)
    N, V, H, stride_h, stride_w, inv_t, V_CHUNK,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    n_blocks = tl.cdiv(N, BLOCK_N)
    num_chunks = tl.cdiv(V, V_CHUNK)
    pid = tl.program_id(0)
    chunk = pid // n_blocks
    rows = (pid % n_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    y = tl.load(y_ptr + rows, mask=rows < N, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    v_start = chunk.to(tl.int64) * V_CHUNK
    v_end = tl.minimum(v_start + V_CHUNK, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_h, stride_w, inv_t,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)  # fmt: skip
        z = tl.where(cols[None, :] < v_end, z, float("-inf"))
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


@triton.jit
def logprob_grad_logits_kernel(
    h_ptr,  # [C, H] hidden rows of this token chunk, row stride stride_h
    w_ptr,  # [V, H] weight, row stride stride_w
    b_ptr,  # [V] bias (unused unless HAS_BIAS)
    y_ptr,  # [C] int64 target ids
    lse_ptr,  # [C] fp32 log-sum-exp of z from the forward
    g_ptr,  # [C] fp32 d loss / d logp
    ge_ptr,  # [C] fp32 d loss / d entropy (read only when ENTROPY_GRAD)
    ent_ptr,  # [C] fp32 entropy from the forward (read only when ENTROPY_GRAD)
    gz_ptr,  # [C, V] out: d loss / d logits (pre-temperature), dtype of the scratch buffer, row stride stride_gz
    N, V, H, stride_h, stride_w, stride_gz, col0, inv_t,  # w_ptr / b_ptr start at vocab id col0
    HAS_BIAS: tl.constexpr, ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_h, stride_w, inv_t,
                     HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION)  # fmt: skip
    ok = rows < N
    lse = tl.load(lse_ptr + rows, mask=ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=ok, other=-1)
    x = z - lse[:, None]  # log-probs
    # logp = z_y - lse(z) and z = logits / T, so d logp / d logits = (onehot - p) / T. For the target column
    # 1 - p cancels when the policy is confident (p -> 1): use -expm1(x) there, which keeps full precision.
    is_y = (cols + col0)[None, :] == y[:, None]
    p = tl.exp(x)
    gz = g[:, None] * tl.where(is_y, -_expm1(x), -p)
    if ENTROPY_GRAD:
        # entropy E = -sum p log p, so d E / d z_k = -p_k (log p_k + E)
        ge = tl.load(ge_ptr + rows, mask=ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=ok, other=0.0)
        x_in = tl.where(cols[None, :] < V, x, 0.0)  # past V: p = 0 and x = -inf, whose product is NaN
        gz -= ge[:, None] * p * (x_in + ent[:, None])
    gz = gz * inv_t
    tl.store(gz_ptr + rows[:, None] * stride_gz + cols[None, :], gz.to(gz_ptr.dtype.element_ty),
             mask=ok[:, None] & (cols[None, :] < V))  # fmt: skip


@triton.jit
def matmul_kernel(
    a_ptr,  # [M, K] strides (stride_am, stride_ak)
    b_ptr,  # [K, N] strides (stride_bk, stride_bn)
    c_ptr,  # [M, N] strides (stride_cm, 1); fp32 when ACCUMULATE
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """C = A @ B (or C += A @ B when ACCUMULATE) with fp32 accumulation; grouped tile order for L2 reuse."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=3):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)  # fmt: skip
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)  # fmt: skip
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :]
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ---- launch configurations: pure functions of (dtype, arch); shared with the compile registry


def logits_tile_config(dtype_bytes: int, arch: int | None, forward: bool, precision: str = "tf32") -> dict[str, int]:
    """Tiles of the logits recompute. The forward keeps four running statistics per row beside the tile, so
    its vocab tile is half the backward's to stay clear of spills (checked by the compile report)."""
    if dtype_bytes == 4:
        if precision == "ieee" and forward:
            # full-precision fp32 dots hold their operands in registers (no tensor cores), and the forward
            # also keeps four running statistics per row: a 32-row tile over 8 warps stays off the stack
            return {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 8}
        return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 4}
    if arch is not None and arch >= 90:
        return {"BLOCK_N": 128, "BLOCK_V": 64 if forward else 128, "BLOCK_H": 64, "num_warps": 8}
    return {"BLOCK_N": 64, "BLOCK_V": 64 if forward else 128, "BLOCK_H": 64, "num_warps": 4}


def matmul_config(dtype_bytes: int, arch: int | None) -> dict[str, int]:
    if dtype_bytes == 4:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4}
    if arch is not None and arch >= 90:
        return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8}


def dot_precision(dtype_bytes: int, allow_tf32: bool) -> str:
    """fp32 inputs follow torch's matmul policy: TF32 tensor cores only when torch allows them
    (``torch.set_float32_matmul_precision("high")``), otherwise full-precision FMA ("ieee"). 16-bit inputs
    always run on tensor cores (the setting does not apply to them)."""
    return "tf32" if dtype_bytes < 4 or allow_tf32 else "ieee"


V_CHUNK = 8192  # vocab columns per forward program: ~19 chunks at V = 151936


# (Triton type, bytes per element, dot precision): fp32 twice, for torch's two fp32 matmul policies
_CASES = (("bf16", 2, "tf32"), ("fp16", 2, "tf32"), ("fp32", 4, "tf32"), ("fp32", 4, "ieee"))


@register("grpo")
def logprob_variants(arch: int) -> list[KernelVariant]:
    out = []
    for tl_type, nbytes, precision in _CASES:
        # "fma": a matrix kernel that by request computes on the FMA units (no tensor-core check)
        kind = "matrix" if precision == "tf32" else "fma"
        tag = tl_type if nbytes < 4 else f"{tl_type},{precision}"
        fwd, bwd = logits_tile_config(nbytes, arch, True, precision), logits_tile_config(nbytes, arch, False, precision)
        fwd_tiles = {k: fwd[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H")}
        bwd_tiles = {k: bwd[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H")}
        common = {"h_ptr": f"*{tl_type}", "w_ptr": f"*{tl_type}", "b_ptr": f"*{tl_type}", "y_ptr": "*i64"}
        scalars = {"N": "i32", "V": "i32", "H": "i32", "stride_h": "i32", "stride_w": "i32", "inv_t": "fp32"}
        out.append(KernelVariant(
            name=f"grpo.logprob_fwd[{tag}]", kernel=logprob_fwd_kernel, kind=kind,
            signature={**common, "part_ptr": "*fp32", **scalars, "V_CHUNK": "i32", "HAS_BIAS": "constexpr",
                       "WITH_ENTROPY": "constexpr", **dict.fromkeys(fwd_tiles, "constexpr"), "PRECISION": "constexpr"},
            constexprs={"HAS_BIAS": False, "WITH_ENTROPY": True, **fwd_tiles, "PRECISION": precision},
            num_warps=fwd["num_warps"], aligned=("h_ptr", "w_ptr", "H", "stride_h", "stride_w"),
        ))  # fmt: skip
        for entropy_grad in (False, True):
            out.append(KernelVariant(
                name=f"grpo.logprob_grad_logits[{tag}{',entropy' if entropy_grad else ''}]",
                kernel=logprob_grad_logits_kernel, kind=kind,
                signature={**common, "lse_ptr": "*fp32", "g_ptr": "*fp32", "ge_ptr": "*fp32", "ent_ptr": "*fp32",
                           "gz_ptr": f"*{tl_type}", "N": "i32", "V": "i32", "H": "i32", "stride_h": "i32",
                           "stride_w": "i32", "stride_gz": "i32", "col0": "i32", "inv_t": "fp32",
                           "HAS_BIAS": "constexpr", "ENTROPY_GRAD": "constexpr",
                           **dict.fromkeys(bwd_tiles, "constexpr"), "PRECISION": "constexpr"},
                constexprs={"HAS_BIAS": False, "ENTROPY_GRAD": entropy_grad, **bwd_tiles, "PRECISION": precision},
                num_warps=bwd["num_warps"],
                aligned=("h_ptr", "w_ptr", "gz_ptr", "V", "H", "stride_h", "stride_w", "stride_gz", "col0"),
            ))  # fmt: skip
        mm = matmul_config(nbytes, arch)
        mm_tiles = {k: mm[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        # Launches see unit strides specialised to constexpr 1 (Triton's JIT does this for ints equal to 1):
        # d hidden = G @ W has A and B row-major; d weight = G^T @ H reads A = G^T column-major. Whichever of
        # the two is accumulated over blocks writes an fp32 buffer (see lm_head_logprobs._backward_triton).
        for accumulate, c_type, unit in ((False, tl_type, ("stride_ak", "stride_bn")),
                                         (True, "fp32", ("stride_ak", "stride_bn")),
                                         (False, tl_type, ("stride_am", "stride_bn")),
                                         (True, "fp32", ("stride_am", "stride_bn"))):  # fmt: skip
            sig = {"a_ptr": f"*{tl_type}", "b_ptr": f"*{tl_type}", "c_ptr": f"*{c_type}", "M": "i32", "N": "i32",
                   "K": "i32", "stride_am": "i32", "stride_ak": "i32", "stride_bk": "i32", "stride_bn": "i32",
                   "stride_cm": "i32", "ACCUMULATE": "constexpr", **dict.fromkeys(mm_tiles, "constexpr"),
                   "PRECISION": "constexpr"}  # fmt: skip
            sig.update(dict.fromkeys(unit, "constexpr"))
            aligned = tuple(a for a in ("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_cm")
                            if a not in unit)  # fmt: skip
            out.append(KernelVariant(
                name=f"grpo.matmul[{tag}->{c_type}{',acc' if accumulate else ''},"
                     f"{'A^T' if 'stride_am' in unit else 'A'}]",
                kernel=matmul_kernel,
                kind=kind, signature=sig,
                constexprs={"ACCUMULATE": accumulate, **mm_tiles, **dict.fromkeys(unit, 1), "PRECISION": precision},
                num_warps=mm["num_warps"], aligned=("a_ptr", "b_ptr", "c_ptr", *aligned),
            ))  # fmt: skip
    return out
