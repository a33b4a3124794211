"""Shared benchmark helpers: timing (do_bench medians over rotated inputs on a GPU, best-of-N wall time on the
CPU; forward, backward and both), peak memory (CUDA allocator peak on a GPU, resident-set high-water mark on the
CPU), floors, the environment line, and table output (markdown + CSV + a PNG bar chart)."""

from __future__ import annotations

import contextlib
import csv
import datetime
import gc
import hashlib
import importlib.metadata
import itertools
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# H100 SXM figures (ARCHITECTURE.md): the floors every benchmark reports against.
H100_BF16_TFLOPS = 989.0
H100_FP8_TFLOPS = 1979.0
H100_HBM_TBPS = 3.35
H100_L2_BYTES = 50 * 2**20

# run_all.py --quick points this elsewhere (a smoke run must not overwrite the committed results)
RESULTS = Path(os.environ.get("R1K_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
REPO = Path(__file__).resolve().parent.parent


def time_ms(fn: Callable[..., object], device: str, reps: int = 10, inputs: Sequence[tuple] | None = None) -> float:
    """Time of one call in ms: ``triton.testing.do_bench``'s median on a GPU (warm-up and compilation excluded:
    do_bench runs it first), the best of ``reps`` after a warm-up call on the CPU. With ``inputs`` (argument
    tuples, see ``rotations``) each call takes the next tuple, so a GPU timing does not read an L2-hot copy."""
    if inputs is None:
        call = fn
    else:
        cycle = itertools.cycle(inputs)
        call = lambda: fn(*next(cycle))
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median"))
    call()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def rotations(make: Callable[[], tuple], nbytes: int, device: str) -> list[tuple]:
    """Enough copies of a case's inputs (``make()`` builds one tuple of ``nbytes``) that cycling through them
    evicts the H100's 50 MiB L2 between uses of a copy (at most 8 copies; one on the CPU)."""
    copies = 1 if device != "cuda" else max(1, min(8, math.ceil(2 * H100_L2_BYTES / max(nbytes, 1)) + 1))
    return [make() for _ in range(copies)]


def time_fwd_bwd(forward: Callable[..., torch.Tensor], inputs: Sequence[tuple], device: str,
                 reps: int = 3) -> tuple[float, float, float]:  # fmt: skip
    """(forward, backward, forward + backward) ms of ``forward(*args)`` over rotated ``inputs``. The output's
    gradient is a fixed random tensor (a scalar output gets 1); backward = (forward + backward) - forward, so
    both include the autograd graph's construction exactly once."""
    grads = {}

    def both(*args):
        out = forward(*args)
        key = tuple(out.shape)
        if key not in grads:
            grads[key] = torch.randn_like(out) if out.dim() else torch.ones_like(out)
        for a in args:  # no accumulation into an earlier call's gradient
            if isinstance(a, torch.Tensor):
                a.grad = None
        out.backward(grads[key])

    fwd = time_ms(forward, device, reps, inputs)
    total = time_ms(both, device, reps, inputs)
    return fwd, max(total - fwd, 0.0), total


def flops_floor_ms(flops: float, tflops: float) -> float:
    return flops / (tflops * 1e12) * 1e3


def bytes_floor_ms(nbytes: float) -> float:
    return nbytes / (H100_HBM_TBPS * 1e12) * 1e3


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


@dataclass(frozen=True)
class Plot:
    """How ``write_table`` draws a table: one bar per row, labelled by ``label`` columns (the case) and coloured
    by ``series`` (the implementation), length from the ``value`` column (log scale when it spans > 30x)."""

    label: tuple[str, ...]
    series: str
    value: str
    title: str = ""


def write_table(name: str, header: list[str], rows: list[list[object]], plot: Plot | None = None,
                note: str = "") -> str:  # fmt: skip
    """Print a markdown table and write it as CSV and markdown under benchmarks/results/ (and ``plot`` as PNG);
    ``note`` (the device, what is timed, how the floor is computed) goes above the markdown table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    md = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in cells]
    )
    if note:
        md = f"{note}\n\n{md}"
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *cells])
    (RESULTS / f"{name}.md").write_text(md + "\n")
    print(md)
    if plot is not None:
        draw(RESULTS / f"{name}.png", header, rows, plot)
    return md


def draw(path: Path, header: list[str], rows: list[list[object]], plot: Plot) -> None:
    """A horizontal bar chart of one numeric column; skipped (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: no {path.name}")
        return
    col = {h: i for i, h in enumerate(header)}
    points = [(" ".join(str(r[col[c]]) for c in plot.label), str(r[col[plot.series]]), r[col[plot.value]])
              for r in rows if isinstance(r[col[plot.value]], (int, float)) and r[col[plot.value]] > 0]  # fmt: skip
    if not points:
        return
    series = list(dict.fromkeys(s for _, s, _ in points))
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(points) + 1.4))
    ys = range(len(points))[::-1]
    ax.barh(list(ys), [v for _, _, v in points], color=[colors(series.index(s) % 10) for _, s, _ in points])
    ax.set_yticks(list(ys), [f"{label} | {s}" for label, s, _ in points], fontsize=7)
    values = [v for _, _, v in points]
    if max(values) / min(values) > 30:
        ax.set_xscale("log")
    ax.set_xlabel(plot.value)
    ax.set_title(plot.title or path.stem, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def environment(device: str) -> str:
    """One line: date, device, the versions of torch and every peer that imports, and the commit."""
    versions = []
    for dist in ("torch", "triton", "transformers", "trl", "liger-kernel", "deep-gemm", "flash-mla",
                 "transformer-engine"):  # fmt: skip
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                                check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{stamp}; {device_name(device)}; {', '.join(versions)}; r1kernels commit {commit}"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    from r1kernels.cpu_caps import bf16_gemm_path

    return f"CPU ({torch.get_num_threads()} threads; {bf16_gemm_path()})"


def _is_kernel_source(path: str) -> bool:
    parts = Path(path).parts
    return (parts[0] == "csrc" and len(parts) > 1) or (
        parts[0] == "r1kernels" and len(parts) > 2 and parts[-2] == "kernels" and path.endswith(".py")
    )


def kernel_sources_digest(rev: str | None = None) -> str:
    """A digest of every kernel's source (the Triton kernel modules and csrc/): the report records it, and a
    test fails when the kernels change without the committed CPU report being regenerated. ``rev``: read the
    files as committed there (run_all uses HEAD, so edits not yet committed cannot slip into the record)."""
    if rev is None:
        files = [str(f.relative_to(REPO)) for top in ("csrc", "r1kernels") for f in (REPO / top).rglob("*")
                 if f.is_file()]  # fmt: skip
        read = lambda path: (REPO / path).read_bytes()
    else:
        listing = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev], capture_output=True, text=True,
                                 cwd=REPO, check=True).stdout.split()  # fmt: skip
        files = listing
        read = lambda path: subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, cwd=REPO,
                                           check=True).stdout  # fmt: skip
    h = hashlib.sha256()
    for path in sorted(f for f in files if _is_kernel_source(f) and "__pycache__" not in f):
        h.update(path.encode() + b"\0" + read(path))
    return h.hexdigest()[:16]
