"""MLA training attention benchmark (``r1kernels.mla.mla_attention``), forward + backward into q, k_nope, k_pe
and v, beside ``torch.nn.functional.scaled_dot_product_attention`` on the same inputs with k_pe broadcast to
every head (what FA-style kernels need), causal.

Forward, backward and forward + backward times (do_bench medians over rotated inputs on a GPU, best of N on the
CPU). GPU: TFLOP/s against the floor (2 * S^2 / 2 * H * (Dqk + Dv) FLOPs forward, 2.5x that backward, at 989
TFLOP/s bf16), FlashMLA beside the paged decode when it imports. CPU: time and peak memory (RSS high-water in a
fresh process per implementation).

    python benchmarks/bench_mla.py [--seq 2048] [--heads 16] [--dims 128,64,128]
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import (
    H100_BF16_TFLOPS,
    H100_HBM_TBPS,
    Plot,
    device_name,
    peak_mem_mib,
    peak_mem_mib_fresh_process,
    rotations,
    time_fwd_bwd,
    time_ms,
    write_table,
)

import r1kernels


def _inputs(S, H, dn, dr, dv, device, dtype):
    """q, k_nope, k_pe, v for one sequence of S tokens."""
    torch.manual_seed(0)
    return [(torch.randn(shape, device=device) * 0.5).to(dtype).requires_grad_()
            for shape in ((1, S, H, dn + dr), (1, S, H, dn), (1, S, dr), (1, S, H, dv))]  # fmt: skip


def _r1k_forward(q, kn, kp, v):
    return r1kernels.mla.mla_attention(q, kn, kp, v, causal=True)[0]


def _sdpa_forward(q, kn, kp, v):
    H = q.shape[2]
    k = torch.cat([kn, kp[:, :, None, :].expand(-1, -1, H, -1)], dim=-1)  # the shared key, broadcast
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            is_causal=True)  # fmt: skip


FORWARDS = {"r1k mla_attention": _r1k_forward, "torch SDPA (k_pe broadcast)": _sdpa_forward}


def _step(forward, *inputs):
    out = forward(*inputs)
    out.backward(torch.ones_like(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dims", default="128,64,128", help="Dn,Dr,Dv")
    parser.add_argument("--mem-child", nargs=4, help=argparse.SUPPRESS)  # impl, S, H, dims: fresh-process probe
    args = parser.parse_args()
    if args.mem_child:
        name, S, H, dims = args.mem_child
        forward, shape = FORWARDS[name], (int(S), int(H), *(int(d) for d in dims.split(",")))
        _step(forward, *_inputs(64, *shape[1:], "cpu", torch.float32))  # load libraries and start threads first
        inputs = _inputs(*shape, "cpu", torch.float32)
        print(peak_mem_mib(lambda: _step(forward, *inputs), "cpu"))
        return
    dn, dr, dv = (int(d) for d in args.dims.split(","))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    S, H = args.seq, args.heads
    fwd_flops = 2 * S * S / 2 * H * (dn + dr + dv)  # QK^T and PV over the causal half
    flops = 3.5 * fwd_flops  # the backward recomputes P and forms dV, dP, dQ, dK: 2.5x the forward
    floor = flops / (H100_BF16_TFLOPS * 1e12) * 1e3
    rows = []
    base = None
    nbytes = S * H * (2 * dn + dr + dv) * 2
    inputs = rotations(lambda: tuple(_inputs(S, H, dn, dr, dv, device, dtype)), nbytes, device)
    for name, forward in FORWARDS.items():
        fwd, bwd, both = time_fwd_bwd(forward, inputs, device)
        if device == "cuda":
            mem = peak_mem_mib(lambda forward=forward: _step(forward, *inputs[0]), device)
        else:
            mem = peak_mem_mib_fresh_process(__file__, [name, str(S), str(H), args.dims])
        base = base or (both, mem)
        rows.append([f"S{S} H{H} {dn}+{dr}/{dv} causal", name, fwd, bwd, both, both / base[0], mem, mem / base[1],
                     flops / both / 1e9, floor, floor / both])  # fmt: skip
    where = "allocator peak" if device == "cuda" else "extra RSS high-water of the step in a fresh process"
    note = f"device: {device_name(device)}, {dtype}; forward + backward; memory: {where} (MiB)"
    rows += _decode_rows(device, dtype)
    header = ["shape", "impl", "fwd ms", "bwd ms", "ms (fwd+bwd; decode: the call)", "time vs r1k", "peak MiB",
              "peak vs r1k", "TFLOP/s or GB/s", "floor ms (H100)", "floor/achieved"]  # fmt: skip
    plot = Plot(("shape",), "impl", "ms (fwd+bwd; decode: the call)", "MLA, ms (lower is better)")
    write_table(f"mla_{device}", header, rows, plot, note=note)


def _decode_rows(device, dtype, B=16, heads=128, cached=4096, page=64):
    """Decode over the paged latent cache: GB/s against the 1152 bytes/token (bf16 latent) floor, FlashMLA beside
    it where it imports. On the CPU a smaller cache (the torch path)."""
    if device == "cpu":
        B, heads, cached = 4, 16, 1024
    blocks = cached // page
    cache = torch.randn(B * blocks, page, 576, device=device).to(dtype)
    table = torch.randperm(B * blocks, device=device).view(B, blocks).int()
    lengths = torch.full((B,), cached, dtype=torch.int32, device=device)
    q = torch.randn(B, 1, heads, 576, device=device).to(dtype)
    nbytes = B * cached * 576 * cache.element_size()
    floor = nbytes / (H100_HBM_TBPS * 1e12) * 1e3
    impls = {"r1k mla_decode": lambda: r1kernels.mla.mla_decode(q, cache, table, lengths, softmax_scale=0.07)}
    try:
        import flash_mla

        meta, splits = flash_mla.get_mla_metadata(lengths, heads, 1)
        paged = cache.unsqueeze(2)  # FlashMLA's [blocks, page, 1 kv head, 576]
        impls["FlashMLA"] = lambda: flash_mla.flash_mla_with_kvcache(q, paged, table, lengths, 512, meta, splits,
                                                                     softmax_scale=0.07, causal=True)  # fmt: skip
    except ImportError:
        pass
    out = []
    for name, fn in impls.items():
        ms = time_ms(fn, device)
        out.append([f"decode B{B} H{heads} {cached} cached, page {page}", name, "", "", ms, "", "", "",
                    f"{nbytes / ms / 1e6:.0f} GB/s", floor, floor / ms])  # fmt: skip
    return out


if __name__ == "__main__":
    sys.exit(main())
