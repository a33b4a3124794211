"""The main demo. Until the GRPO training loop lands it shows the FP8 quantization ops against their
reference on the CPU and the ahead-of-time compile report of every Triton kernel.

    python -m r1kernels.demo [--skip-compile-report]
"""

from __future__ import annotations

import argparse

import torch

import r1kernels
from r1kernels import compile_report
from r1kernels.fp8 import reference as ref


def fp8_demo() -> None:
    x = torch.randn(512, 7168, dtype=torch.bfloat16) * torch.logspace(-2, 2, 512)[:, None]
    print(f"FP8 quantization of x {tuple(x.shape)} bf16 on {'CUDA' if x.is_cuda else 'the CPU'}")
    for name, quant, dequant, ref_quant in (
        ("per-token-group 1x128", r1kernels.fp8.quantize_per_token_group,
         r1kernels.fp8.dequantize_per_token_group, ref.quantize_per_token_group),
        ("per-block 128x128", r1kernels.fp8.quantize_per_block,
         r1kernels.fp8.dequantize_per_block, ref.quantize_per_block),
    ):  # fmt: skip
        q, s = quant(x)
        rq, rs = ref_quant(x)
        same = torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
        back = dequant(q, s, out_dtype=torch.float32)
        err = float((back - x.float()).norm() / x.float().norm())
        print(f"  {name:<22} scales {tuple(s.shape)}  bitwise equal to reference: {same}  "
              f"round-trip rel. error {err:.2e}")  # fmt: skip
        if not same:
            raise SystemExit(f"{name}: kernel output differs from the reference")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-compile-report", action="store_true")
    args = parser.parse_args(argv)
    fp8_demo()
    if args.skip_compile_report:
        return 0
    print("\nAhead-of-time compile report (no GPU needed):")
    return compile_report.main([])


if __name__ == "__main__":
    raise SystemExit(main())
