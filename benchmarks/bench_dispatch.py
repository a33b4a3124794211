"""Host-side overhead of each public op on tiny (decode-sized) CPU inputs.

Per op and input (the ``input`` column; MLA decode and the grouped weight gradient also at full size, where
their own math is most of the call), microseconds per call (median of repeated timing loops), against the cost
of a two-op torch expression (``x.abs().amax()`` on the same tiny tensor) in the same process:

- ``public``: the public function (validation once, backend choice, eager call of the implementation);
- ``torch.ops``: the registered op through torch.library's dispatcher (what torch.compile graphs call);
- ``bare``: the implementation alone (the C++ call or the CPU path's function the op runs after its checks,
  on pre-allocated outputs where it takes them), no validation, backend choice or dispatch;
- ``public / expr``: the target is at most 5x (median over rounds of the ratio within a round, each round timing
  the expression, public, torch.ops and bare one after another: robust to noise; beside it the ratio of each
  one's fastest round);
- ``(public - bare) / expr``: the host-side overhead alone, for ops whose smallest input already holds more math
  than the expression (the weight gradients, full-size MLA decode, the loss); also taken within each round.

Below the FP8 and LM-head ops, the other ops of a decode step at one token's size (``decode_cases``).

    python benchmarks/bench_dispatch.py [--reps 2000] [--only OP ...]   # --only: print those rows, write nothing
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
from common import write_table

import r1kernels
import r1kernels.mla
import r1kernels.moe
from r1kernels._ext import cpp_dtype, ext
from r1kernels._ops import OPS
from r1kernels.fp8.tiles import tile_geometry
from r1kernels.grpo import lm_head_cpu
from r1kernels.moe import row_launchers

# the implementations behind the ops (the "bare" column); some share a name with a function the package exports
gemm_module, grouped_module, masked_module, grouped_wgrad_module, quantize_transposed_module = (
    importlib.import_module(f"r1kernels.fp8.{m}")
    for m in ("gemm_nt", "grouped_gemm_nt", "masked_grouped_gemm_nt", "grouped_wgrad_gemm", "quantize_transposed")
)
swiglu_module, grouped_linear_module, mla_attention_module, mla_decode_module, fused_loss_module = (
    importlib.import_module(f"r1kernels.{m}")
    for m in ("moe.swiglu", "moe.grouped_linear", "mla.attention", "mla.decode", "grpo.fused_loss")
)


def _loop_us(fn, reps: int) -> float:
    """CPU time of this thread per call: with one torch thread that is the whole call, and time the OS gives
    to other processes on a shared machine is not counted (wall-clock ratios swung 2x under load)."""
    t0 = time.thread_time()
    for _ in range(reps):
        fn()
    return (time.thread_time() - t0) / reps * 1e6


def rounds_us(fns, reps: int, rounds: int = 11) -> list[list[float]]:
    """Per round, the us per call of each of ``fns`` timed one after another, so that a noisy neighbour or a
    frequency change shifts them alike; the ratios are then taken within a round."""
    for fn in fns:
        fn()
    return [[_loop_us(fn, reps) for fn in fns] for _ in range(rounds)]


def cases():
    """(op, input, public call, torch.ops call, bare kernel call) on tiny inputs."""
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    q, s = r1kernels.fp8.quantize_per_token_group(x)
    w = torch.randn(1, 128)
    wq, ws = r1kernels.fp8.quantize_per_block(w)
    q_out, s_out = torch.empty_like(q), torch.empty_like(s)
    d_out = torch.empty(1, 128, dtype=torch.bfloat16)
    ops = torch.ops.r1k

    def bare_quant():
        ext().quantize_fp8_tiles_cpu(x=x.data_ptr(), dtype=cpp_dtype(x.dtype), geometry=tile_geometry(x, 1, 128, s_out),
                                     out=q_out.data_ptr(), scales=s_out.data_ptr(), pow2=False)  # fmt: skip

    def bare_dequant():
        ext().dequantize_fp8_tiles_cpu(q=q.data_ptr(), scales=s.data_ptr(), geometry=tile_geometry(q, 1, 128, s),
                                       out=d_out.data_ptr(), out_dtype=cpp_dtype(d_out.dtype))  # fmt: skip

    wq_out, ws_out = torch.empty_like(wq), torch.empty_like(ws)

    def bare_block_quant():
        ext().quantize_fp8_tiles_cpu(x=w.data_ptr(), dtype=cpp_dtype(w.dtype), geometry=tile_geometry(w, 128, 128,
                                     ws_out), out=wq_out.data_ptr(), scales=ws_out.data_ptr(), pow2=False)  # fmt: skip

    h, lm, ids = torch.randn(1, 64), torch.randn(128, 64), torch.randint(0, 128, (1,))
    _, lse, ent = r1kernels.grpo.token_logprob_stats(h, lm, ids, return_entropy=True)
    g = torch.randn(1)
    yield ("quantize_fp8_per_token_group", "[1, 128] bf16", lambda: r1kernels.fp8.quantize_per_token_group(x),
           lambda: ops.quantize_fp8_per_token_group(x, 128, False, False), bare_quant)  # fmt: skip
    yield ("quantize_fp8_per_block", "[1, 128] fp32", lambda: r1kernels.fp8.quantize_per_block(w),
           lambda: ops.quantize_fp8_per_block(w, 128, False), bare_block_quant)  # fmt: skip
    yield ("dequantize_fp8_per_token_group", "[1, 128] codes", lambda: r1kernels.fp8.dequantize_per_token_group(q, s),
           lambda: ops.dequantize_fp8_per_token_group(q, s, 128, torch.bfloat16), bare_dequant)  # fmt: skip
    yield ("dequantize_fp8_per_block", "[1, 128] codes", lambda: r1kernels.fp8.dequantize_per_block(wq, ws),
           lambda: ops.dequantize_fp8_per_block(wq, ws, 128, torch.bfloat16), None)  # fmt: skip
    yield ("token_logprob_stats", "1 token, H 64, V 128", lambda: r1kernels.grpo.token_logprob_stats(h, lm, ids),
           lambda: ops.token_logprob_stats(h, lm, None, ids, 1.0, False),
           lambda: lm_head_cpu.forward(h, lm, None, ids, 1.0, False))  # fmt: skip
    yield ("token_logprob_stats_backward", "1 token, H 64, V 128",
           lambda: OPS["token_logprob_stats_backward"](g, None, h, lm, None, ids, lse,
           ent, 1.0), lambda: ops.token_logprob_stats_backward(g, None, h, lm, None, ids, lse, ent, 1.0),
           lambda: lm_head_cpu.backward(g, None, h, lm, None, ids, lse, ent, 1.0))  # fmt: skip


def decode_cases():
    """(op, input, public call, torch.ops call, bare call) of the other ops a decode step calls, at DeepSeek-V3's
    decode sizes for one token: routing over 256 experts (8 groups, top 4 groups, top 8), the permutation index
    and the permute / unpermute of its 8 rows (hidden 128 here, to stay tiny), absorbed MLA decode of 16 heads
    over one cached key (a sequence's first step: the tiny input) and over a 64-key page, whose own math
    (~1.1M multiply-adds) the overhead column separates from the call's."""
    ops = torch.ops.r1k
    logits, bias = torch.randn(1, 256), torch.randn(256)
    route_out = torch.empty(1, 8), torch.empty(1, 8, dtype=torch.int32)
    route_problem = ext().RouteProblem(tokens=1, experts=256, top_k=8, n_group=8, topk_group=4,
                                       routed_scaling_factor=2.5, norm_topk_prob=True, softmax=False)  # fmt: skip
    yield ("moe_route", "1 token, 256 experts",
           lambda: r1kernels.moe.route(logits, bias, top_k=8, n_group=8, topk_group=4,
                                                    routed_scaling_factor=2.5),
           lambda: ops.moe_route(logits, bias, 8, 8, 4, 2.5, True, "sigmoid"),
           lambda: ext().route_cpu(logits=logits.data_ptr(), dtype=cpp_dtype(logits.dtype), bias=bias.data_ptr(),
                                   problem=route_problem, weights=route_out[0].data_ptr(),
                                   ids=route_out[1].data_ptr()))  # fmt: skip
    expert_ids = r1kernels.moe.route(logits, bias, top_k=8, n_group=8, topk_group=4)[1]
    index = r1kernels.moe.permutation_index(expert_ids, 256)
    index_out = {n: torch.empty_like(t) for n, t in index._asdict().items()}
    perm_problem = ext().PermutationProblem(slots=8, experts=256, align=1, rows=8)
    yield ("moe_permutation_index", "1 token, top 8 of 256", lambda: r1kernels.moe.permutation_index(expert_ids, 256),
           lambda: ops.moe_permutation_index(expert_ids, 256, 1, 8),
           lambda: ext().permutation_index_cpu(expert_ids=expert_ids.data_ptr(), problem=perm_problem,
                                               **{n: t.data_ptr() for n, t in index_out.items()}))  # fmt: skip
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    yield ("moe_permute", "8 rows of 128", lambda: r1kernels.moe.moe_permute(x, index),
           lambda: ops.moe_permute(x, index.source, index.row_of),
           lambda: row_launchers.gather_rows(x, index.source, 8, None, "moe_permute"))  # fmt: skip
    rows, weights = r1kernels.moe.moe_permute(x, index), torch.rand(1, 8)
    yield ("moe_unpermute", "8 rows of 128", lambda: r1kernels.moe.moe_unpermute(rows, index, weights),
           lambda: ops.moe_unpermute(rows, index.source, index.row_of, weights),
           lambda: row_launchers.combine_rows(rows, index.row_of, weights, "moe_unpermute"))  # fmt: skip
    q = torch.randn(1, 1, 16, 576, dtype=torch.bfloat16)
    cache = torch.randn(2, 64, 576, dtype=torch.bfloat16)
    out, lse = torch.empty(1, 1, 16, 512, dtype=torch.bfloat16), torch.empty(1, 16, 1)
    table = torch.tensor([[1]], dtype=torch.int32)
    for keys, label in ((1, "16 heads, 1 key"), (64, "16 heads, 64 keys (1.1M MACs)")):
        lengths = torch.tensor([keys], dtype=torch.int32)
        yield ("mla_decode", label, lambda n=lengths: r1kernels.mla.mla_decode(q, cache, table, n, softmax_scale=0.07),
               lambda n=lengths: ops.mla_decode(q, cache, table, n, 0.07, True, 512),
               lambda n=lengths: mla_decode_module._decode_cpu(q, cache, table, n, 0.07, True, out, lse))  # fmt: skip


def other_cases():
    """(op, input, public call, torch.ops call, bare call) of the remaining ops at their smallest useful inputs: one
    token through a 128 x 128 FP8 GEMM (the grouped forms: one real row in a 128-row segment, as a decode step
    routes one token to an expert; the grouped weight gradient also with all 128 tokens real), the weight
    gradient of a 128 x 128 weight over the 16 tokens quantize_transposed pads to, a [1, 256] SwiGLU, one
    token's 8 rows through 8 experts' 64 x 128 weights, one query of a 1-head MLA with 32 + 16 dims, the fused
    GRPO loss op on one token (H 64, V 128)."""
    ops, fp8, moe = torch.ops.r1k, r1kernels.fp8, r1kernels.moe
    x, w = torch.randn(1, 128, dtype=torch.bfloat16), torch.randn(128, 128)
    (a, sa), (b, sb) = fp8.quantize_per_token_group(x), fp8.quantize_per_block(w)
    yield ("quantize_fp8_transposed", "[1, 128] bf16", lambda: fp8.quantize_transposed(x),
           lambda: ops.quantize_fp8_transposed(x, False, None),
           lambda: quantize_transposed_module._cpu(x, None, False))  # fmt: skip
    out = torch.empty(1, 128, dtype=torch.bfloat16)
    yield ("fp8_gemm_nt", "1 x 128 x 128", lambda: fp8.gemm_nt(a, sa, b, sb),
           lambda: ops.fp8_gemm_nt(a, sa, b, sb, torch.bfloat16, None),
           lambda: gemm_module.cpu_gemm(a, sa, b, sb, out))  # fmt: skip
    am, sam = (t[None] for t in (a, sa))
    masked_m, bg, sbg = torch.tensor([1], dtype=torch.int32), b[None], sb[None]
    yield ("fp8_grouped_gemm_nt_masked", "1 x 128 x 128",
           lambda: fp8.grouped_gemm_nt_masked(am, sam, bg, sbg, masked_m),
           lambda: ops.fp8_grouped_gemm_nt_masked(am, sam, bg, sbg, masked_m, torch.bfloat16),
           lambda: masked_module._cpu(am, sam, bg, sbg, masked_m, out[None]))  # fmt: skip
    xt, sxt = fp8.quantize_transposed(torch.randn(16, 128, dtype=torch.bfloat16))
    out32 = torch.empty(128, 128)
    yield ("fp8_wgrad_gemm", "128 x 128 x 16 tokens (262k MACs)", lambda: fp8.wgrad_gemm(xt, sxt, xt, sxt),
           lambda: ops.fp8_wgrad_gemm(xt, sxt, xt, sxt, None),
           lambda: gemm_module.cpu_gemm(xt, sxt, xt, sxt, out32, None, b_tile_rows=1))  # fmt: skip
    a128, s128 = fp8.quantize_per_token_group(torch.randn(128, 128))
    m_idx, out128 = torch.zeros(128, dtype=torch.int32), torch.empty(128, 128, dtype=torch.bfloat16)
    one_real = torch.full((128,), -1, dtype=torch.int32)
    one_real[0] = 0  # decode: one token routed to the expert, its segment padded to 128 rows
    yield ("fp8_grouped_gemm_nt_contiguous", "1 real row of 128, 128 x 128",
           lambda: fp8.grouped_gemm_nt_contiguous(a128, s128, bg, sbg, one_real),
           lambda: ops.fp8_grouped_gemm_nt_contiguous(a128, s128, bg, sbg, one_real, torch.bfloat16),
           lambda: grouped_module._cpu(a128, s128, bg, sbg, one_real, out128, 1))  # fmt: skip
    out_g = torch.empty(1, 128, 128)
    for ids, label in ((one_real, "1 real token of 128, 128 x 128"), (m_idx, "128 tokens, 128 x 128 (2.1M MACs)")):
        t, st = fp8.quantize_transposed(torch.randn(128, 128), m_indices=ids)
        yield ("fp8_grouped_wgrad_gemm", label,
               lambda t=t, st=st, ids=ids: fp8.grouped_wgrad_gemm(t, st, t, st, ids, 1),
               lambda t=t, st=st, ids=ids: ops.fp8_grouped_wgrad_gemm(t, st, t, st, ids, 1, None),
               lambda t=t, st=st, ids=ids: grouped_wgrad_module._cpu(t, st, t, st, ids, out_g, None))  # fmt: skip
    h = torch.randn(1, 256, dtype=torch.bfloat16)
    yield (
        "moe_swiglu",
        "[1, 256] bf16",
        lambda: moe.swiglu(h),
        lambda: ops.moe_swiglu(h),
        lambda: swiglu_module._run(h),
    )
    index = moe.permutation_index(torch.randperm(8)[None].to(torch.int32), 8)
    rows, ew = torch.randn(8, 128, dtype=torch.bfloat16), torch.randn(8, 64, 128, dtype=torch.bfloat16)
    yield ("moe_grouped_linear", "8 rows, 8 experts of 64 x 128", lambda: moe.grouped_linear(rows, ew, index),
           lambda: ops.moe_grouped_linear(rows, ew, index.row_expert, index.offsets, index.counts),
           lambda: grouped_linear_module._forward(rows, ew, index.row_expert, index.offsets, index.counts))  # fmt: skip
    q, kn, kp, v = (torch.randn(1, 1, 1, 48), torch.randn(1, 1, 1, 32), torch.randn(1, 1, 16), torch.randn(1, 1, 1, 32))
    yield ("mla_attention", "1 query, 1 head, 32 + 16 dims", lambda: r1kernels.mla.mla_attention(q, kn, kp, v),
           lambda: ops.mla_attention(q, kn, kp, v, True, 48**-0.5, None, None),
           lambda: mla_attention_module._forward(q, kn, kp, v, True, 48**-0.5, None, None))  # fmt: skip
    hid, lm, ids = torch.randn(1, 64), torch.randn(128, 64), torch.randint(0, 128, (1,))
    one, adv = torch.ones(1), torch.randn(1)
    terms = (one, adv, None, None, None, 1.0, 0.0, 0.2, 0.2, None, 20.0, 0.0, False, False)
    pointers = [one.data_ptr(), adv.data_ptr(), 0, 0, 0]  # the per-token terms, as the op passes them
    yield ("grpo_token_loss_fused", "1 token, H 64, V 128",
           lambda: OPS["grpo_token_loss_fused"](hid, lm, None, ids, *terms),
           lambda: ops.grpo_token_loss_fused(hid, lm, None, ids, *terms),
           lambda: fused_loss_module._tiny_cpu(hid, lm, None, ids, 1, 64, 128, pointers, *terms[5:]))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--only", nargs="+", metavar="OP", help="time these ops and print them (no table written)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny inputs: thread start-up would dominate and vary
    x = torch.randn(1, 128, dtype=torch.bfloat16)

    def expr():
        return x.abs().amax()

    expr_us = statistics.median(t[0] for t in rounds_us([expr], args.reps))
    rows = []
    for name, label, public, dispatched, bare in (*cases(), *decode_cases(), *other_cases()):
        assert name in OPS
        if args.only and name not in args.only:
            continue
        rounds = rounds_us([expr, public, dispatched] + ([bare] if bare is not None else []), args.reps)
        expr_t, pub_t, disp_t = ([r[i] for r in rounds] for i in range(3))
        pub, disp = statistics.median(pub_t), statistics.median(disp_t)
        pub_ratio = statistics.median(p / e for p, e in zip(pub_t, expr_t, strict=True))
        disp_ratio = statistics.median(d / e for d, e in zip(disp_t, expr_t, strict=True))
        b = overhead = float("nan")
        if bare is not None:
            b = statistics.median(r[3] for r in rounds)
            overhead = statistics.median((r[1] - r[3]) / r[0] for r in rounds)
        rows.append([name, label, round(pub, 1), round(disp, 1), round(b, 1), round(pub_ratio, 2),
                     round(min(pub_t) / min(expr_t), 2), round(overhead, 2), round(disp_ratio, 2)])  # fmt: skip
    print(f"x.abs().amax() on [1, 128] bf16: {expr_us:.1f} us per call")
    if args.only:
        for row in rows:
            print(*row, sep="\t")
        return
    write_table("dispatch_cpu", ["op", "input", "public us", "torch.ops us", "bare us", "public / expr",
                                 "public / expr (fastest rounds)", "(public - bare) / expr", "torch.ops / expr"],
                rows)  # fmt: skip


if __name__ == "__main__":
    main()
