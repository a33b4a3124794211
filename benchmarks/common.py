"""Shared benchmark helpers: timing (do_bench on a GPU, best-of-N wall time on the CPU), peak memory
(CUDA allocator peak on a GPU, resident-set high-water mark on the CPU), floors, and table output."""

from __future__ import annotations

import csv
import gc
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# H100 SXM figures (ARCHITECTURE.md): the floors every benchmark reports against.
H100_BF16_TFLOPS = 989.0
H100_FP8_TFLOPS = 1979.0
H100_HBM_TBPS = 3.35

RESULTS = Path(__file__).resolve().parent / "results"


def time_ms(fn: Callable[[], object], device: str, reps: int = 10) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mem_mib(fn: Callable[[], object], device: str) -> float:
    """Extra memory ``fn`` needs at its peak, over what is allocated before it runs."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # Linux: writing 5 to clear_refs resets the high-water mark (VmHWM) to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss_kib("VmRSS")
    result = fn()
    peak = _rss_kib("VmHWM")
    del result
    return (peak - base) / 1024


def peak_mem_mib_fresh_process(script: str, args: list[str]) -> float:
    """CPU peak memory of one case, measured in a fresh process so that allocator caches left by earlier
    cases cannot hide it: runs ``script --mem-child ARGS`` and reads the MiB it prints last."""
    out = subprocess.run([sys.executable, script, "--mem-child", *args], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def write_table(name: str, header: list[str], rows: list[list[object]]) -> str:
    """Print a markdown table and write it as CSV and markdown under benchmarks/results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    md = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in cells]
    )
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *cells])
    (RESULTS / f"{name}.md").write_text(md + "\n")
    print(md)
    return md


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    from r1kernels.cpu_caps import bf16_gemm_path

    return f"CPU ({torch.get_num_threads()} threads; {bf16_gemm_path()})"
