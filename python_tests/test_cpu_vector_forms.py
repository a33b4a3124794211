"""The C++ CPU kernels pick their vector form at run time (csrc/common/cpu_isa.h: AVX-512, AVX2 + F16C, or the
baseline build); R1K_CPU_ISA caps it per process. The forms are written to give the same bits (the same
decode, the same summation order), so a result never depends on the machine: each capped form runs in a
fresh process on the same inputs and must match this process's results exactly, NaN for NaN."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import r1kernels
from r1kernels._ext import ext

NAN_CODE = torch.tensor(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)


def results(seed: int) -> dict[str, torch.Tensor]:
    """Outputs of the ops whose CPU paths run the vector forms: the few-row FP8 GEMMs (dense with and without
    c, masked, contiguous grouped with padding rows; K with a partial last 128-block; N not a multiple of the
    4-column step; a NaN code in a and in b), the e4m3 decode of the dequantize op, and the decode-sized LM
    head's forward and backward (fp32 and bf16, bias, temperature, entropy), the few-row MoE expert linear
    (K not a multiple of 8, N not of 4)."""
    torch.manual_seed(seed)
    fp8, out = r1kernels.fp8, {}
    with r1kernels.use_backend("cpu"):
        for M, N, K in ((1, 130, 128), (5, 67, 208), (16, 256, 512)):
            a, sa = fp8.quantize_per_token_group(torch.randn(M, K) * 3)
            b, sb = fp8.quantize_per_block(torch.randn(N, K))
            a[M // 2, K - 3], b[N - 2, 5] = NAN_CODE, NAN_CODE
            out[f"gemm {M}x{N}x{K}"] = fp8.gemm_nt(a, sa, b, sb, out_dtype=torch.float32)
            out[f"gemm+c {M}x{N}x{K}"] = fp8.gemm_nt(a, sa, b, sb, c=torch.randn(M, N, dtype=torch.bfloat16))
            out[f"dequant {M}x{K}"] = fp8.dequantize_per_token_group(a, sa, out_dtype=torch.float32)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):  # quantization: row tiles, blocks, x.T
            x = torch.randn(37, 300, dtype=dtype) * 5
            x[3, 7], x[20, 290] = float("nan"), float("inf")
            for name, pair in (
                ("per token group", fp8.quantize_per_token_group(x)),
                ("per block", fp8.quantize_per_block(x)),
                ("transposed", fp8.quantize_transposed(x)),
            ):
                out[f"quantize {name} {dtype} codes"] = pair[0].view(torch.uint8)
                out[f"quantize {name} {dtype} scales"] = pair[1]
        G, M, N, K = 3, 6, 72, 256
        a, sa = fp8.quantize_per_token_group(torch.randn(G * M, K))
        pairs = [fp8.quantize_per_block(torch.randn(N, K)) for _ in range(G)]
        b, sb = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        counts = torch.tensor([M, 0, 4], dtype=torch.int32)
        out["masked"] = fp8.grouped_gemm_nt_masked(a.view(G, M, K), sa.view(G, M, -1), b, sb, counts)
        ids = torch.full((128,), -1, dtype=torch.int32)
        ids[:3] = 2
        a128, sa128 = fp8.quantize_per_token_group(torch.randn(128, K))
        out["contiguous"] = fp8.grouped_gemm_nt_contiguous(a128, sa128, b, sb, ids, out_dtype=torch.float32)[:3]
        index = r1kernels.moe.permutation_index(torch.tensor([[0, 3], [3, 1], [4, 0], [-1, 2]], dtype=torch.int32), 5)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):  # weights read in place in each dtype
            x, w = torch.randn(7, 100, dtype=dtype), torch.randn(5, 66, 100, dtype=dtype)
            out[f"grouped linear {dtype}"] = r1kernels.moe.grouped_linear(x, w, index)
        for dtype in (torch.float32, torch.bfloat16):  # decode-sized LM head: one C++ call each way
            N, H, V = 3, 72, 200
            h, w, bias = torch.randn(N, H, dtype=dtype), torch.randn(V, H, dtype=dtype), torch.randn(V, dtype=dtype)
            ids = torch.randint(0, V, (N,))
            logp, lse, ent = r1kernels.grpo.token_logprob_stats(h, w, ids, bias=bias, temperature=0.7,
                                                                return_entropy=True)  # fmt: skip
            grads = r1kernels._ops.OPS["token_logprob_stats_backward"](torch.randn(N), torch.randn(N), h, w, bias, ids,
                                                                       lse, ent, 0.7)  # fmt: skip
            for name, t in zip(("logp", "lse", "entropy", "d hidden", "d weight", "d bias"), (logp, lse, ent, *grads),
                               strict=True):  # fmt: skip
                out[f"lm head {dtype} {name}"] = t
    return out


def _child(isa: str, seed: int, path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "R1K_CPU_ISA"} | {"R1K_CPU_ISA": isa}
    code = f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); " \
           f"import {Path(__file__).stem} as t; torch.save(t.results({seed}), {str(path)!r})"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_capped_vector_form_gives_the_same_bits(isa, fresh_seed, tmp_path):
    want = results(fresh_seed)
    assert any(torch.isnan(t).any() for t in want.values())  # the NaN codes reached the outputs
    _child(isa, fresh_seed, tmp_path / "out.pt")
    got = torch.load(tmp_path / "out.pt")
    assert got.keys() == want.keys()
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=0, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="binutils' objdump is not installed")
def test_no_fused_multiply_add_in_the_cpu_kernels():
    """The forms the loader picks per CPU (R1K_VECTOR_CLONES' AVX-512 / AVX2 / baseline clones, which R1K_CPU_ISA
    cannot cap) agree only if no form fuses a * b + c into one rounding: the build turns contraction off
    (CMakeLists.txt), so the module holds no FMA instruction at all."""
    module = Path(ext().__file__)
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(module)], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    fused = [line for line in listing.splitlines() if re.search(r"\bv?f(n)?m(add|sub)\d{3}[ps][sd]\b", line)]
    assert not fused, f"{len(fused)} FMA instructions in {module.name}, e.g. {fused[:3]}"
