"""FP8 linear layer benchmark (``r1kernels.fp8.FP8Linear``): one training step's three GEMMs plus the
quantizations they need (forward, then backward into x.grad and weight.grad), and the weight-gradient GEMM
alone.

GPU: ms and TFLOP/s against the floor 6MNK / 1979 TFLOP/s (H100 FP8 dense; 2MNK for the wgrad GEMM alone),
beside torch's bf16 ``nn.Linear`` (its floor: 6MNK / 989 TFLOP/s). The default shape is torchao's published
one (M=16640, N=5120, K=8192: bf16 608, torchao Triton 399, cuBLASLt blockwise 1009 TFLOP/s forward; wgrad
bf16 433, Triton 309, cuBLASLt 580). CPU: r1k's CPU path against an fp32 ``nn.Linear`` (time, RSS peak).
Accuracy: DeepGEMM's calc_diff of y, x.grad and weight.grad against an fp32 linear of the same inputs.

    python benchmarks/bench_fp8_linear.py [--shapes 16640x5120x8192,...]   # MxNxK
"""

from __future__ import annotations

import argparse

import torch
from common import H100_BF16_TFLOPS, H100_FP8_TFLOPS, device_name, peak_mem_mib, time_ms, write_table
from torch import nn

import r1kernels
from r1kernels.fp8 import reference as ref


def _step(layer, x, dy):
    def run():
        layer.weight.grad = None
        x.grad = None
        layer(x).backward(dy)
        return x.grad

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=None, help="comma list of MxNxK")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = args.shapes or ("16640x5120x8192,4096x7168x2048" if device == "cuda" else "2048x1024x1024")
    header = ["M", "N", "K", "impl", "ms", "TFLOP/s", "floor ms (H100)", "floor/achieved", "calc_diff y / dx / dW",
              "peak MiB"]  # fmt: skip
    rows = []
    for shape in shapes.split(","):
        m, n, k = (int(v) for v in shape.split("x"))
        x = torch.randn(m, k, device=device)
        dy = torch.randn(m, n, device=device)
        fp8 = r1kernels.fp8.FP8Linear(k, n, bias=False, device=device)
        exact = nn.Linear(k, n, bias=False, device=device)
        exact.weight.data.copy_(fp8.weight.data)
        x32 = x.clone().requires_grad_()
        y32 = exact(x32)
        y32.backward(dy)
        work_dtype = torch.bfloat16 if device == "cuda" else torch.float32
        xw = x.to(work_dtype).requires_grad_()
        dyw = dy.to(work_dtype)
        y = fp8(xw)
        y.backward(dyw)
        pairs = ((y, y32), (xw.grad, x32.grad), (fp8.weight.grad, exact.weight.grad))
        diffs = "/".join(f"{ref.calc_diff(t.float(), e):.1e}" for t, e in pairs)
        impls = {"r1k FP8Linear": (_step(fp8, xw, dyw), 6, H100_FP8_TFLOPS, diffs)}
        base = exact if device == "cpu" else nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        impls["torch nn.Linear " + ("fp32" if device == "cpu" else "bf16")] = (
            _step(base, xw, dyw),
            6,
            H100_BF16_TFLOPS,
            "",
        )
        dytq, dyts = r1kernels.fp8.quantize_transposed(dyw)
        xtq, xts = r1kernels.fp8.quantize_transposed(xw.detach())
        wgrad = (dytq, dyts, xtq, xts)
        impls["r1k wgrad_gemm alone"] = (lambda wgrad=wgrad: r1kernels.fp8.wgrad_gemm(*wgrad), 2, H100_FP8_TFLOPS, "")
        for name, (fn, flop_mult, peak, diff) in impls.items():
            flops = flop_mult * m * n * k
            ms = time_ms(fn, device, reps=3)
            floor_ms = flops / (peak * 1e12) * 1e3
            rows.append([m, n, k, name, ms, flops / ms / 1e9, floor_ms, floor_ms / ms, diff, peak_mem_mib(fn, device)])
    print(f"device: {device_name(device)}; a step = forward + backward into x.grad and weight.grad (6MNK FLOPs); "
          "floor at the H100 SXM dense peak of the step's math (FP8 for r1k, bf16 for torch)")  # fmt: skip
    write_table(f"fp8_linear_{device}", header, rows)


if __name__ == "__main__":
    main()
