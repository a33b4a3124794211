"""FP8 quantization benchmark.

GPU: GB/s of the Triton kernels (and the CUDA C++ per-token-group kernel) against the bytes floor
(read x once, write x_fp8 and the scales once) at H100 bandwidth, beside the plain PyTorch reference.
CPU: the fused C++ path against the plain PyTorch reference: time and extra peak memory.

    python benchmarks/bench_fp8.py [--shapes 4096x7168,16384x7168]
"""

from __future__ import annotations

import argparse

import torch
from common import (
    H100_HBM_TBPS,
    Plot,
    bytes_floor_ms,
    device_name,
    peak_mem_mib,
    peak_mem_mib_fresh_process,
    rotations,
    time_ms,
    write_table,
)

import r1kernels
from r1kernels.fp8 import reference as ref


def _bytes(m: int, k: int, in_bytes: int, tile_m: int) -> int:
    return m * k * in_bytes + m * k + -(-m // tile_m) * -(-k // 128) * 4


OPS = {
    "per_token_group": (1, r1kernels.fp8.quantize_per_token_group, ref.quantize_per_token_group),
    "per_block": (128, r1kernels.fp8.quantize_per_block, ref.quantize_per_block),
}


def _call(op: str, backend: str | None, x: torch.Tensor | None = None):
    """A call of one implementation: on ``x`` when given, else on the tensor it is called with (rotation)."""
    _, fn, ref_fn = OPS[op]
    run = ref_fn if backend is None else (lambda t: _with_backend(backend, fn, t))
    return (lambda t=x: run(t)) if x is not None else run


def _mem_child(op: str, backend: str, shape: str) -> None:
    m, k = (int(v) for v in shape.split("x"))
    x = torch.randn(m, k, dtype=torch.bfloat16)
    backend = None if backend == "none" else backend
    _call(op, backend, x[:8, :256])()  # load libraries and start threads before measuring
    print(peak_mem_mib(_call(op, backend, x), "cpu"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="4096x7168,16384x7168,7168x2048")
    parser.add_argument("--mem-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mem_child:
        return _mem_child(*args.mem_child)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = {"r1k triton": "triton", "r1k cuda": "cuda"} if device == "cuda" else {"r1k C++": "cpu"}
    header = ["op", "shape", "impl", "ms", "GB/s", "floor ms (H100)", "floor/achieved", "extra peak MiB"]
    rows = []
    for shape in args.shapes.split(","):
        m, k = (int(v) for v in shape.split("x"))
        xs = rotations(lambda m=m, k=k: (torch.randn(m, k, dtype=torch.bfloat16, device=device),), m * k * 2, device)
        x = xs[0][0]
        for op, (tile_m, _, _) in OPS.items():
            nbytes = _bytes(m, k, 2, tile_m)
            floor_ms = bytes_floor_ms(nbytes)
            cases = [(name, b) for name, b in impls.items() if not (b == "cuda" and tile_m > 1)]
            cases.append(("torch reference", None))
            for name, b in cases:
                call = _call(op, b, x)
                ms = time_ms(_call(op, b), device, inputs=xs)
                if device == "cuda":
                    mem = peak_mem_mib(call, device)
                else:
                    mem = peak_mem_mib_fresh_process(__file__, [op, b or "none", shape])
                rows.append([op, shape, name, ms, nbytes / ms / 1e6, floor_ms, floor_ms / ms, mem])
    note = (
        f"device: {device_name(device)}; floor = bytes read + written once / {H100_HBM_TBPS} TB/s (H100 SXM); "
        "extra peak MiB includes the outputs (x_fp8 is M*K bytes)"
    )
    write_table(
        f"fp8_{device}",
        header,
        rows,
        Plot(("op", "shape"), "impl", "ms", "FP8 quantization, ms (lower is better)"),
        note=note,
    )


def _with_backend(name: str, fn, x):
    with r1kernels.use_backend(name):
        return fn(x)


if __name__ == "__main__":
    main()
