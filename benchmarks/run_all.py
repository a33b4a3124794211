"""Run every benchmark and the compile report, and collect their tables into one markdown report.

    python benchmarks/run_all.py [--quick]      # writes benchmarks/results/REPORT_<device>.md

On a GPU machine this is the one command to run first: each table states its floor and the ratio to it, so the
report tests the predictions in NOTES.md. The report's header gives the date, the device, the versions of torch
and every peer that imports, the commit, and a digest of the kernel sources: the committed CPU report must be
regenerated when a kernel changes (python_tests/test_benchmark_report.py checks the digest). ``--quick`` runs
small shapes into benchmarks/results/quick/ (a smoke run; the committed results stay as they are).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# (title, results stem, benchmark script, full-size arguments on the CPU, --quick arguments)
BENCHMARKS = [
    ("FP8 quantization", "fp8", "bench_fp8.py", [], ["--shapes", "512x1024"]),
    ("FP8 GEMM (gemm_nt)", "fp8_gemm", "bench_fp8_gemm.py", ["--m", "64,1024"], ["--m", "64", "--nk", "2112x7168"]),
    ("FP8 linear layer (fprop + dgrad + wgrad)", "fp8_linear", "bench_fp8_linear.py", [],
     ["--shapes", "1024x512x512"]),
    ("MoE (routing, permute / unpermute, grouped GEMM, the layer)", "moe", "bench_moe.py", [],
     ["--tokens", "512", "--route-tokens", "1024"]),
    ("MLA attention (training forward + backward, paged decode)", "mla", "bench_mla.py", [],
     ["--seq", "256", "--heads", "4"]),
    ("GRPO loss (fused LM head + loss, forward + backward)", "grpo", "bench_grpo.py", ["--dtype", "fp32,bf16"],
     ["--dtype", "fp32,bf16", "--B", "2", "--T", "64", "--H", "128", "--V", "4096"]),
    ("The main job: one GRPO step of the tiny DeepSeek-V3", "train", "bench_train.py", [], ["--rows", "16"]),
    ("Host-side cost of a call (decode-sized inputs)", "dispatch", "bench_dispatch.py", [], ["--reps", "200"]),
]  # fmt: skip


def _run(cmd: list[str], results: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["R1K_BENCH_RESULTS"] = str(results)
    subprocess.run(cmd, cwd=HERE, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, into results/quick/")
    parser.add_argument("--only", default="", help="comma list of result stems to rerun (others are reused)")
    args = parser.parse_args()
    results = HERE / "results" / ("quick" if args.quick else "")
    os.environ["R1K_BENCH_RESULTS"] = str(results)  # before common reads it
    sys.path.insert(0, str(HERE))
    from common import environment, kernel_sources_digest

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kernel_sources_digest() != kernel_sources_digest("HEAD"):
        print("warning: kernel sources differ from HEAD; the report records HEAD's digest (commit them first)")
    results.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    py = sys.executable
    for _, stem, script, full, quick in BENCHMARKS:
        if only and stem not in only:
            continue
        _run([py, script, *(quick if args.quick else full if device == "cpu" else [])], results)
    if not only or "compile_report" in only:
        _run([py, "-m", "r1kernels.compile_report", "--cuda", "--markdown", str(results / "compile_report.md")],
             results)  # fmt: skip
    lines = [
        f"# r1kernels benchmark report ({device})\n",
        f"{environment(device)}; kernel sources {kernel_sources_digest('HEAD')}\n",
        "Each table: the device line, what is timed and how the floor is computed (FLOPs over peak or bytes over"
        " bandwidth, H100 SXM figures), then the rows; peers appear where they import. CSV and PNG files of the"
        " same name sit beside this report.\n",
    ]
    for title, stem, *_ in BENCHMARKS:
        name = f"{stem}_{device}" if (results / f"{stem}_{device}.md").exists() else f"{stem}_cpu"  # CPU-only ones
        lines += [f"## {title}\n", (results / f"{name}.md").read_text()]
        if (results / f"{name}.png").exists():
            lines.append(f"![{title}]({name}.png)\n")
    lines += ["## Compile report (Triton kernels and CUDA C++, sm_80 / sm_89 / sm_90a)\n",
              (results / "compile_report.md").read_text()]  # fmt: skip
    report = results / f"REPORT_{device}.md"
    report.write_text("\n".join(lines) + "\n")
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
