"""Block-scaled FP8 GEMM benchmark (``r1kernels.fp8.gemm_nt``, DeepGEMM's NT layout).

GPU: TFLOP/s and the ratio to the floor, max(2MNK / 1979 TFLOP/s (H100 FP8 dense), bytes / 3.35 TB/s) with
bytes = M*K + N*K (e4m3) + scales + 2*M*N (bf16 out), beside torch's bf16 matmul of the same shape and
DeepGEMM's ``fp8_gemm_nt`` when it imports. CPU: r1k's CPU path (chunked C++ dequantize + fp32 matmul)
against the plain dequantize-then-matmul reference (float64 in ``reference.py``; here the same in fp32):
time and extra peak memory.

    python benchmarks/bench_fp8_gemm.py [--m 64,128,4096] [--nk 2112x7168,...]
"""

from __future__ import annotations

import argparse

import torch
from common import (
    H100_FP8_TFLOPS,
    H100_HBM_TBPS,
    Plot,
    bytes_floor_ms,
    device_name,
    flops_floor_ms,
    peak_mem_mib,
    rotations,
    time_ms,
    write_table,
)

import r1kernels
from r1kernels.fp8 import reference as ref

DEEPSEEK_NK = "2112x7168,24576x1536,32768x512,7168x16384,4096x7168,7168x2048"


def _operands(M, N, K, device):
    x, w = torch.randn(M, K, device=device), torch.randn(N, K, device=device) * K**-0.5
    a, sa = r1kernels.fp8.quantize_per_token_group(x)
    b, sb = r1kernels.fp8.quantize_per_block(w)
    return x, w, a, sa, b, sb


def _dequant_matmul(a, sa, b, sb):
    """The plain path a user would write: dequantize both operands whole, then one fp32 matmul."""
    return ref.dequantize_tiles(a, sa, 1, 128) @ ref.dequantize_tiles(b, sb, 128, 128).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="64,128,4096", help="comma list of M")
    parser.add_argument("--nk", default=DEEPSEEK_NK, help="comma list of NxK (DeepSeek-V3's by default)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import deep_gemm
    except ImportError:
        deep_gemm = None
    header = ["M", "N", "K", "impl", "ms", "TFLOP/s", "floor ms (H100)", "floor/achieved", "calc_diff", "peak MiB"]
    rows = []
    for m in (int(v) for v in args.m.split(",")):
        for nk in args.nk.split(","):
            n, k = (int(v) for v in nk.split("x"))
            nbytes = m * k + n * k + 4 * (m * -(-k // 128) + -(-n // 128) * -(-k // 128)) + 2 * m * n
            cases = rotations(lambda m=m, n=n, k=k: _operands(m, n, k, device), nbytes, device)
            x, w = cases[0][:2]
            flops = 2 * m * n * k
            floor_ms = max(flops_floor_ms(flops, H100_FP8_TFLOPS), bytes_floor_ms(nbytes))
            exact = x @ w.T
            impls = {"r1k gemm_nt": lambda x, w, a, sa, b, sb: r1kernels.fp8.gemm_nt(a, sa, b, sb)}
            if device == "cuda":
                impls["torch bf16 matmul"] = lambda x, w, *_: x.bfloat16() @ w.bfloat16().T
                if deep_gemm is not None:
                    out = torch.empty(m, n, dtype=torch.bfloat16, device=device)
                    impls["DeepGEMM"] = lambda x, w, a, sa, b, sb, out=out: _deep_gemm(deep_gemm, a, sa, b, sb, out)
            else:
                impls["dequantize + matmul"] = lambda x, w, a, sa, b, sb: _dequant_matmul(a, sa, b, sb)
            for name, fn in impls.items():
                inputs = cases
                if name == "torch bf16 matmul":  # its operands in bf16 up front: time the GEMM, not the casts
                    inputs = [(c[0].bfloat16(), c[1].bfloat16()) for c in cases]
                    fn = lambda x, w: x @ w.T
                ms = time_ms(fn, device, reps=3, inputs=inputs)
                got = fn(*inputs[0]).float()
                rows.append([m, n, k, name, ms, flops / ms / 1e9, floor_ms, floor_ms / ms, ref.calc_diff(got, exact),
                             peak_mem_mib(lambda fn=fn, inputs=inputs: fn(*inputs[0]), device)])  # fmt: skip
    note = (f"device: {device_name(device)}; floor = max(2MNK / {H100_FP8_TFLOPS:g} TFLOP/s, bytes / "
          f"{H100_HBM_TBPS} TB/s) on an H100 SXM; calc_diff against an fp32 matmul of the unquantized inputs; "
          "peak MiB: allocator peak on a GPU, in-process RSS high-water on the CPU (indicative)")  # fmt: skip
    write_table(
        f"fp8_gemm_{device}",
        header,
        rows,
        Plot(("M", "N", "K"), "impl", "ms", "FP8 GEMM, ms (lower is better)"),
        note=note,
    )


def _deep_gemm(deep_gemm, a, sa, b, sb, out):
    """DeepGEMM's NT GEMM under its current name (``fp8_gemm_nt``) or its first one
    (``gemm_fp8_fp8_bf16_nt``); the same operands and scales as r1k's (1 x 128 and 128 x 128, fp32)."""
    fn = getattr(deep_gemm, "fp8_gemm_nt", None) or deep_gemm.gemm_fp8_fp8_bf16_nt
    fn((a, sa), (b, sb), out)
    return out


if __name__ == "__main__":
    main()
