"""FP8 linear layer benchmark (``r1kernels.fp8.FP8Linear``): one training step's three GEMMs plus the
quantizations they need (forward, then backward into x.grad and weight.grad), and the weight-gradient GEMM
alone.

GPU: forward, backward and forward + backward ms (do_bench medians over rotated inputs), TFLOP/s of the step
against the floor 6MNK / 1979 TFLOP/s (H100 FP8 dense; 2MNK for the wgrad GEMM alone), beside torch's bf16
``nn.Linear`` (its floor: 6MNK / 989 TFLOP/s) and TransformerEngine's ``te.Linear`` under its blockwise FP8
recipe (``Float8BlockScaling``, DeepSeek-V3's 1 x 128 / 128 x 128 scaling) when it imports. The default shape
is torchao's published one (M=16640, N=5120, K=8192: bf16 608, torchao Triton 399, cuBLASLt blockwise 1009
TFLOP/s forward; wgrad bf16 433, Triton 309, cuBLASLt 580). CPU: r1k's CPU path against an fp32
``nn.Linear`` (time, RSS peak). Accuracy: DeepGEMM's calc_diff of y, x.grad and weight.grad against an fp32
linear of the same inputs.

    python benchmarks/bench_fp8_linear.py [--shapes 16640x5120x8192,...]   # MxNxK
"""

from __future__ import annotations

import argparse

import torch
from common import (
    H100_BF16_TFLOPS,
    H100_FP8_TFLOPS,
    Plot,
    device_name,
    flops_floor_ms,
    peak_mem_mib,
    rotations,
    time_fwd_bwd,
    time_ms,
    write_table,
)
from torch import nn

import r1kernels
from r1kernels.fp8 import reference as ref


def _transformer_engine(k: int, n: int, device: str):
    """TransformerEngine's linear under blockwise FP8 as a forward function, or None where it does not run."""
    if device != "cuda":
        return None
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe

        layer = te.Linear(k, n, bias=False, params_dtype=torch.bfloat16)
        fp8_recipe = recipe.Float8BlockScaling()
    except (ImportError, AttributeError, RuntimeError) as e:
        print(f"TransformerEngine not benchmarked: {e}")
        return None

    def forward(x):
        with te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe):
            return layer(x)

    return forward


def _shape_rows(m: int, n: int, k: int, device: str) -> list[list[object]]:
    x = torch.randn(m, k, device=device)
    dy = torch.randn(m, n, device=device)
    fp8 = r1kernels.fp8.FP8Linear(k, n, bias=False, device=device)
    exact = nn.Linear(k, n, bias=False, device=device)
    exact.weight.data.copy_(fp8.weight.data)
    x32 = x.clone().requires_grad_()
    exact(x32).backward(dy)
    work_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    xw = x.to(work_dtype).requires_grad_()
    y = fp8(xw)
    y.backward(dy.to(work_dtype))
    pairs = ((y, exact(x32)), (xw.grad, x32.grad), (fp8.weight.grad, exact.weight.grad))
    diffs = "/".join(f"{ref.calc_diff(t.float(), e):.1e}" for t, e in pairs)
    inputs = rotations(lambda: (torch.randn(m, k, device=device, dtype=work_dtype).requires_grad_(),), m * k * 2,
                       device)  # fmt: skip
    base = exact if device == "cpu" else nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    impls = {"r1k FP8Linear": (fp8, H100_FP8_TFLOPS, diffs), f"torch nn.Linear {str(base.weight.dtype)[6:]}": (
        base, H100_BF16_TFLOPS, "")}  # fmt: skip
    te_forward = _transformer_engine(k, n, device)
    if te_forward is not None:
        impls["TransformerEngine Linear (FP8 blockwise)"] = (te_forward, H100_FP8_TFLOPS, "")
    rows = []
    for name, (forward, peak, diff) in impls.items():
        fwd, bwd, both = time_fwd_bwd(forward, inputs, device)
        floor_ms = flops_floor_ms(6 * m * n * k, peak)
        mem = peak_mem_mib(lambda forward=forward: forward(inputs[0][0]).sum().backward(), device)
        rows.append([m, n, k, name, fwd, bwd, both, 6 * m * n * k / both / 1e9, floor_ms, floor_ms / both, diff, mem])
    dytq, dyts = r1kernels.fp8.quantize_transposed(dy.to(work_dtype))
    xtq, xts = r1kernels.fp8.quantize_transposed(xw.detach())
    wgrad = lambda: r1kernels.fp8.wgrad_gemm(dytq, dyts, xtq, xts)
    ms = time_ms(wgrad, device, reps=3)
    floor_ms = flops_floor_ms(2 * m * n * k, H100_FP8_TFLOPS)
    rows.append([m, n, k, "r1k wgrad_gemm alone (one GEMM)", "", "", ms, 2 * m * n * k / ms / 1e9, floor_ms,
                 floor_ms / ms, "", peak_mem_mib(wgrad, device)])  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=None, help="comma list of MxNxK")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = args.shapes or ("16640x5120x8192,4096x7168x2048" if device == "cuda" else "2048x1024x1024")
    header = ["M", "N", "K", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "TFLOP/s", "floor ms (H100)",
              "floor/achieved", "calc_diff y / dx / dW", "peak MiB"]  # fmt: skip
    rows = []
    for shape in shapes.split(","):
        rows += _shape_rows(*(int(v) for v in shape.split("x")), device)
    note = (f"device: {device_name(device)}; a step = forward + backward into x.grad and weight.grad (6MNK FLOPs); "
          "backward = step - forward; floor at the H100 SXM dense peak of the step's math (FP8 for r1k and TE, "
          "bf16 for torch)")  # fmt: skip
    plot = Plot(("M", "N", "K"), "impl", "fwd+bwd ms", "FP8 linear, forward + backward ms (lower is better)")
    write_table(f"fp8_linear_{device}", header, rows, plot, note=note)


if __name__ == "__main__":
    main()
