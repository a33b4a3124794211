"""The main demo: GRPO training on a verifiable task with the fused GRPO ops, every op checked against
its reference as it trains; then the FP8 quantization ops against theirs; optionally the ahead-of-time
compile report of every Triton kernel.

    python -m r1kernels.demo [--steps 600] [--backend auto|cpu|triton] [--compile-report]

``--backend triton`` on a machine without a GPU runs the Triton kernels in Triton's interpreter (slow:
use a few steps).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch


def fp8_demo() -> None:
    import r1kernels
    from r1kernels.fp8 import reference as ref

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = (torch.randn(512, 7168) * torch.logspace(-2, 2, 512)[:, None]).to(torch.bfloat16).to(device)
    print(f"\nFP8 quantization of x {tuple(x.shape)} bf16 on {device}")
    for name, quant, dequant, ref_quant in (
        ("per-token-group 1x128", r1kernels.fp8.quantize_per_token_group,
         r1kernels.fp8.dequantize_per_token_group, ref.quantize_per_token_group),
        ("per-block 128x128", r1kernels.fp8.quantize_per_block,
         r1kernels.fp8.dequantize_per_block, ref.quantize_per_block),
    ):  # fmt: skip
        q, s = quant(x)
        rq, rs = ref_quant(x.cpu())
        same = torch.equal(q.view(torch.uint8).cpu(), rq.view(torch.uint8)) and torch.equal(s.cpu(), rs)
        back = dequant(q, s, out_dtype=torch.float32)
        err = float((back - x.float()).norm() / x.float().norm())
        print(f"  {name:<22} scales {tuple(s.shape)}  bitwise equal to reference: {same}  "
              f"round-trip rel. error {err:.2e}")  # fmt: skip
        if not same:
            raise SystemExit(f"{name}: kernel output differs from the reference")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--backend", choices=("auto", "cpu", "triton"), default="auto")
    parser.add_argument("--compile-report", action="store_true", help="also compile every Triton kernel")
    args = parser.parse_args(argv)
    if args.backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be on before triton is first imported, and `python -m r1kernels.demo` has
        # already imported it with the r1kernels package: run the demo again in a process that has it on.
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        cmd = [sys.executable, "-m", "r1kernels.demo", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env).returncode
    import r1kernels
    from r1kernels.train.grpo_addition import Config, train

    if args.backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        from r1kernels import _interpreter_shim

        _interpreter_shim.install()
    print(f"GRPO on 'add two digits' (ops on backend {args.backend!r}):")
    with r1kernels.use_backend(args.backend):
        train(Config(steps=args.steps, device="cuda" if torch.cuda.is_available() else "cpu"))
    fp8_demo()
    if args.compile_report:
        from r1kernels import compile_report

        print("\nAhead-of-time compile report (no GPU needed):")
        return compile_report.main(["--cuda"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
