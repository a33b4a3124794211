"""Run every benchmark and the compile report, and collect their tables into one markdown report.

    python benchmarks/run_all.py [--quick]      # writes benchmarks/results/REPORT.md

On a GPU machine this is the one command to run first: each table states its floor and the ratio to it,
so the report tests the predictions in NOTES.md. ``--quick`` uses small shapes (a smoke run).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

import torch
from common import RESULTS, device_name

HERE = Path(__file__).resolve().parent


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run(cmd, cwd=HERE, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    py = sys.executable
    RESULTS.mkdir(parents=True, exist_ok=True)
    fp8_shapes = "512x1024" if args.quick else "4096x7168,16384x7168,7168x2048"
    grpo = ["--B", "2", "--T", "64", "--H", "128", "--V", "4096"] if args.quick else []
    _run([py, "bench_fp8.py", "--shapes", fp8_shapes])
    _run([py, "bench_grpo.py", "--dtype", "fp32,bf16", *grpo])
    gemm = ["--m", "64", "--nk", "2112x7168"] if args.quick else ([] if device == "cuda" else ["--m", "64,1024"])
    _run([py, "bench_fp8_gemm.py", *gemm])
    _run([py, "bench_fp8_linear.py", *(["--shapes", "1024x512x512"] if args.quick else [])])
    moe = ["--tokens", "512", "--route-tokens", "1024"] if args.quick else []
    _run([py, "bench_moe.py", *moe])
    _run([py, "bench_mla.py", *(["--seq", "256", "--heads", "4"] if args.quick else [])])
    _run([py, "bench_train.py", *(["--rows", "16"] if args.quick else [])])
    _run([py, "-m", "r1kernels.compile_report", "--cuda", "--markdown", str(RESULTS / "compile_report.md")])
    sections = [
        ("FP8 quantization", f"fp8_{device}.md"),
        ("GRPO loss (forward + backward)", f"grpo_{device}.md"),
        ("FP8 GEMM (gemm_nt)", f"fp8_gemm_{device}.md"),
        ("FP8 linear layer (fprop + dgrad + wgrad)", f"fp8_linear_{device}.md"),
        ("MoE (routing, permute / unpermute, grouped GEMM, the layer)", f"moe_{device}.md"),
        ("MLA training attention (forward + backward)", f"mla_{device}.md"),
        ("The main job: one GRPO step of the tiny DeepSeek-V3", f"train_{device}.md"),
        ("Compile report (sm_80 / sm_89 / sm_90a)", "compile_report.md"),
    ]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# r1kernels benchmark report\n\n{stamp}, {device_name(device)}, torch {torch.__version__}\n"]
    for title, name in sections:
        lines += [f"## {title}\n", (RESULTS / name).read_text(), ""]
    (RESULTS / "REPORT.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'REPORT.md'}")


if __name__ == "__main__":
    main()
