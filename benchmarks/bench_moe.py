"""MoE benchmark (``r1kernels.moe``): the whole layer forward + backward beside transformers' ``DeepseekV3MoE``
(its ``grouped_mm`` experts, the fastest of its implementations here), routing beside
``DeepseekV3TopkRouter``, and the pieces against their floors.

Floors (H100 SXM): routing reads the fp32 logits once and writes k weights and ids per token; permute /
unpermute move each token row once in and k times out (bytes / 3.35 TB/s); the grouped expert GEMMs against
a dense GEMM of equal FLOPs (the same rows through one weight), on the GPU also against 989 TFLOP/s bf16; the
layer's forward + backward against its GEMMs' FLOPs (routed and shared experts, 3x the forward's) at 989
TFLOP/s. GPU: do_bench medians over rotated inputs; CPU: best of N, 2 threads on the dev machine.

    python benchmarks/bench_moe.py [--tokens 4096] [--hidden 512] [--experts 64] [--top-k 6] [--inter 256]
"""

from __future__ import annotations

import argparse

import torch
from common import (
    H100_BF16_TFLOPS,
    H100_HBM_TBPS,
    Plot,
    bytes_floor_ms,
    device_name,
    rotations,
    time_fwd_bwd,
    time_ms,
    write_table,
)

import r1kernels


def _hf_moe(args, device, dtype):
    try:
        import transformers
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE, DeepseekV3TopkRouter
    except ImportError:
        return None, None
    config = transformers.DeepseekV3Config(
        hidden_size=args.hidden, moe_intermediate_size=args.inter, n_routed_experts=args.experts,
        n_shared_experts=1, num_experts_per_tok=args.top_k, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        norm_topk_prob=True, experts_implementation="grouped_mm",
    )  # fmt: skip
    return DeepseekV3MoE(config).to(device, dtype), DeepseekV3TopkRouter(config).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--route-tokens", type=int, default=8192)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    T, H, E, k, inter = args.tokens, args.hidden, args.experts, args.top_k, args.inter
    header = ["what", "impl", "ms", "vs peer", "throughput", "floor ms (H100)", "floor/achieved"]
    rows = []

    # routing: 8192 tokens x E experts, 8 groups / top-4, from fp32 logits
    hf_moe, hf_router = _hf_moe(args, device, dtype)
    hidden = torch.randn(args.route_tokens, H, device=device)
    weight = torch.randn(E, H, device=device) * H**-0.5
    bias = torch.randn(E, device=device) * 0.01
    logits = hidden @ weight.T
    ours = time_ms(lambda: r1kernels.moe.route(logits, bias, top_k=k, n_group=8, topk_group=4,
                                               routed_scaling_factor=2.5), device)  # fmt: skip
    peer = float("nan")
    if hf_router is not None:
        with torch.no_grad():
            hf_router.weight.copy_(weight)
            hf_router.e_score_correction_bias.copy_(bias)
            gemm = time_ms(lambda: hidden @ weight.T, device)
            # the router's own logits GEMM is not part of route(): take it out of HF's time
            peer = time_ms(lambda: hf_router(hidden), device) - gemm
        rows.append([f"route {args.route_tokens}x{E}", "HF DeepseekV3TopkRouter (minus its GEMM)", peer, 1.0,
                     f"{args.route_tokens / peer / 1e3:.2f} Mtok/s", "", ""])  # fmt: skip
    route_floor = bytes_floor_ms(args.route_tokens * (E * 4 + k * 12) + E * 4)
    rows.append([f"route {args.route_tokens}x{E}", "r1k route", ours, peer / ours,
                 f"{args.route_tokens / ours / 1e3:.2f} Mtok/s", route_floor, route_floor / ours])  # fmt: skip

    # permute / unpermute
    x = torch.randn(T, H, device=device, dtype=dtype)
    w, ids = r1kernels.moe.route(torch.randn(T, E, device=device), top_k=k, n_group=8, topk_group=4)
    index = r1kernels.moe.permutation_index(ids, E, align=1 if device == "cpu" else 128)
    rows_ = r1kernels.moe.moe_permute(x, index)
    nbytes = T * H * x.element_size() * (1 + k)
    floor = nbytes / (H100_HBM_TBPS * 1e12) * 1e3
    for name, fn in (("permute", lambda: r1kernels.moe.moe_permute(x, index)),
                     ("unpermute", lambda: r1kernels.moe.moe_unpermute(rows_, index, w))):  # fmt: skip
        ms = time_ms(fn, device)
        rows.append([f"{name} T{T} H{H} k{k}", "r1k", ms, "", f"{nbytes / ms / 1e6:.1f} GB/s", floor, floor / ms])

    # grouped expert GEMM (gate_up) vs a dense GEMM of equal FLOPs
    w_up = torch.randn(E, 2 * inter, H, device=device, dtype=dtype) * H**-0.5
    flops = 2 * T * k * 2 * inter * H
    grouped = time_ms(lambda: r1kernels.moe.grouped_linear(rows_, w_up, index), device)
    dense_x = torch.randn(T * k, H, device=device, dtype=dtype)
    dense = time_ms(lambda: dense_x @ w_up[0].T, device)
    gemm_floor = flops / (H100_BF16_TFLOPS * 1e12) * 1e3
    rows.append([f"gate_up GEMM {T * k}x{2 * inter}x{H}", "dense matmul, equal FLOPs", dense, 1.0,
                 f"{flops / dense / 1e9:.2f} TFLOP/s", gemm_floor, gemm_floor / dense])  # fmt: skip
    rows.append([f"gate_up GEMM {T * k}x{2 * inter}x{H}", "r1k grouped_linear", grouped, dense / grouped,
                 f"{flops / grouped / 1e9:.2f} TFLOP/s", gemm_floor, gemm_floor / grouped])  # fmt: skip

    # the whole layer, forward + backward
    layer = r1kernels.moe.MoE(H, inter, E, 1, k, 8, 4, 2.5, True, device=device, dtype=dtype)
    layer.gate.float()
    inputs = rotations(lambda: (torch.randn(T, H, device=device, dtype=dtype, requires_grad=True),),
                       T * H * 2, device)  # fmt: skip
    what = f"MoE layer T{T} H{H} E{E} k{k} I{inter}"
    layer_flops = 3 * 2 * T * (k + 1) * 3 * inter * H  # gate_up + down per routed pick and the shared expert
    layer_floor = layer_flops / (H100_BF16_TFLOPS * 1e12) * 1e3
    ours = time_fwd_bwd(layer, inputs, device)
    peer = (float("nan"),) * 3
    if hf_moe is not None:
        hf_moe.load_state_dict(layer.state_dict())
        peer = time_fwd_bwd(hf_moe, inputs, device)
        rows += [[f"{what} {part}", "HF DeepseekV3MoE (grouped_mm)", ms, 1.0, "", "", ""]
                 for part, ms in zip(("fwd", "bwd"), peer[:2], strict=True)]  # fmt: skip
        rows.append([f"{what} fwd+bwd", "HF DeepseekV3MoE (grouped_mm)", peer[2], 1.0,
                     f"{layer_flops / peer[2] / 1e9:.2f} TFLOP/s", layer_floor, layer_floor / peer[2]])  # fmt: skip
    rows += [[f"{what} {part}", "r1k MoE", ms, p / ms, "", "", ""]
             for part, ms, p in zip(("fwd", "bwd"), ours[:2], peer[:2], strict=True)]  # fmt: skip
    rows.append([f"{what} fwd+bwd", "r1k MoE", ours[2], peer[2] / ours[2], f"{layer_flops / ours[2] / 1e9:.2f} TFLOP/s",
                 layer_floor, layer_floor / ours[2]])  # fmt: skip
    note = f"device: {device_name(device)}, {dtype}; 'vs peer' = peer time / this time (above 1: faster)"
    write_table(f"moe_{device}", header, rows, Plot(("what",), "impl", "ms", "MoE, ms (lower is better)"), note=note)


if __name__ == "__main__":
    main()
