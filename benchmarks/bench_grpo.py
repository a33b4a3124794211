"""Fused GRPO loss benchmark: forward + backward (loss.backward() filling hidden.grad and weight.grad).

Three implementations of the same loss (token-level clipped surrogate + beta * k3 KL; aggregation ``grpo``,
masked mean per sequence then mean over sequences, or with ``--loss-type dapo`` the masked mean over all tokens):

- ``r1k``: ``r1kernels.grpo.grpo_loss`` (never materialises the ``[tokens, vocab]`` logits);
- ``plain``: PyTorch on full logits as TRL's GRPOTrainer computes it (``plain_grpo_loss`` below);
- ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (chunked), when it imports.

Per implementation: time of forward + backward (best of ``--reps`` on the CPU, do_bench median on a GPU),
extra peak memory (CPU: resident-set high-water mark in a fresh process; GPU: allocator peak), and the
loss, which must agree with the plain loss (relative difference < 1e-3 in fp32). On a GPU also TFLOP/s
against the 6 * N * H * V floor (N = B * T tokens) at the H100's 989 TFLOP/s; fused kernels that
recompute the logits in the backward do 8 * N * H * V.

    python benchmarks/bench_grpo.py [--B 8 --T 512 --H 1024 --V 32000 --dtype fp32 --impls r1k,plain,liger]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from common import (
    H100_BF16_TFLOPS,
    Plot,
    device_name,
    peak_mem_mib,
    peak_mem_mib_fresh_process,
    time_ms,
    write_table,
)

from r1kernels.grpo import grpo_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("r1k", "plain", "liger")  # the default set; also r1k_two_pass: grpo_loss(single_pass=False)
BETA = 0.04
EPSILON = 0.2
TEMPERATURE = 1.0
LOGP_NOISE = 0.05  # old / ref log-probs = true log-probs + N(0, LOGP_NOISE^2): some ratios clip
GPU_EXTRA_SHAPE = (4096, 151936)  # H, V (Qwen-sized LM head), added on a GPU
WARMUP_SHAPE = (2, 64, 64, 2048)  # B, T, H, V of the child's warm-up call: large enough for the blocked CPU path
LOSS_RTOL = {"fp32": 1e-3, "bf16": 1e-2}
LOSS_TYPES = ("grpo", "dapo")


def loss_type() -> str:
    """grpo (sequence means) or dapo (global token mean); an environment variable so the memory child
    processes measure the same loss."""
    return os.environ.get("R1K_BENCH_LOSS_TYPE", "grpo")


# ---- the plain PyTorch loss (TRL GRPOTrainer semantics) ----------------------------------------------


def plain_grpo_loss(hidden, weight, token_ids, completion_mask, advantages, old_logps, ref_logps,
                    beta=BETA, epsilon=EPSILON, temperature=TEMPERATURE):  # fmt: skip
    """GRPO loss on the full ``[B, T, V]`` logits, the way TRL computes it from a model's logits."""
    logits = hidden @ weight.T / temperature  # the LM head, in the input dtype
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logp - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if beta != 0.0:
        d = ref_logps - logp
        per_token = per_token + beta * (torch.exp(d) - d - 1)  # k3 estimate of KL(pi || pi_ref)
    mask = completion_mask
    if loss_type() == "dapo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


# ---- inputs and the three implementations ------------------------------------------------------------


def make_inputs(B: int, T: int, H: int, V: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) * H**-0.5).to(device, dtype)
    token_ids = torch.randint(0, V, (B, T), generator=g).to(device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)  # right padding, as in a GRPO batch
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float().to(device)
    advantages = torch.randn(B, generator=g).to(device)
    logp = torch.empty(B, T, device=device)
    with torch.no_grad():  # the true log-probs, one sequence at a time (independent of the code under test)
        w32 = weight.float()
        for b in range(B):
            logits = hidden[b].float() @ w32.T / TEMPERATURE
            logp[b] = torch.log_softmax(logits, dim=-1).gather(-1, token_ids[b, :, None]).squeeze(-1)
        del w32, logits
    old = logp + LOGP_NOISE * torch.randn(B, T, generator=g).to(device)
    ref = logp + LOGP_NOISE * torch.randn(B, T, generator=g).to(device)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    return dict(hidden=hidden, weight=weight, token_ids=token_ids, mask=mask, advantages=advantages,
                old=old, ref=ref)  # fmt: skip


def _r1k(x: dict) -> torch.Tensor:
    loss, _ = grpo_loss(
        x["hidden"], x["weight"], x["token_ids"], x["mask"], x["advantages"],
        old_logps=x["old"], ref_logps=x["ref"], beta=BETA, epsilon_low=EPSILON, temperature=TEMPERATURE,
        loss_type=loss_type(),
    )  # fmt: skip
    return loss


def _r1k_two_pass(x: dict) -> torch.Tensor:
    loss, _ = grpo_loss(
        x["hidden"], x["weight"], x["token_ids"], x["mask"], x["advantages"],
        old_logps=x["old"], ref_logps=x["ref"], beta=BETA, epsilon_low=EPSILON, temperature=TEMPERATURE,
        loss_type=loss_type(), single_pass=False,
    )  # fmt: skip
    return loss


def _plain(x: dict) -> torch.Tensor:
    return plain_grpo_loss(x["hidden"], x["weight"], x["token_ids"], x["mask"], x["advantages"], x["old"], x["ref"])


_LIGER: dict = {}


def liger_loss_module(device: str):
    """``LigerFusedLinearGRPOLoss`` configured like TRL's GRPOTrainer does (chunk of one sequence), or raise.

    ``compiled``: Liger torch.compiles only the O(tokens) loss math; on the CPU that needs a C++ toolchain
    and adds seconds of compile time for nothing measurable, so it is off there."""
    if device not in _LIGER:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        _LIGER[device] = LigerFusedLinearGRPOLoss(
            beta=BETA, compiled=device == "cuda", use_ref_model=True, chunk_size=1, epsilon_low=EPSILON,
            epsilon_high=EPSILON, loss_type=loss_type(), temperature=TEMPERATURE,
        )  # fmt: skip
    return _LIGER[device]


def _liger(x: dict) -> torch.Tensor:
    module = liger_loss_module(x["hidden"].device.type)
    loss, _metrics = module(
        _input=x["hidden"], lin_weight=x["weight"], selected_token_ids=x["token_ids"], attention_mask=x["mask"],
        advantages=x["advantages"], ref_per_token_logps=x["ref"], old_per_token_logps=x["old"],
    )  # fmt: skip
    return loss


LOSS_FNS = {"r1k": _r1k, "r1k_two_pass": _r1k_two_pass, "plain": _plain, "liger": _liger}


def fwd_bwd(impl: str, x: dict):
    """One training step's worth of loss work: forward, then backward into hidden.grad and weight.grad."""

    def call() -> torch.Tensor:
        x["hidden"].grad = None
        x["weight"].grad = None
        loss = LOSS_FNS[impl](x)
        loss.backward()
        return loss.detach()

    return call


# ---- peak memory in a fresh process ------------------------------------------------------------------


def _mem_child(impl: str, B: str, T: str, H: str, V: str, dtype: str) -> None:
    dt = DTYPES[dtype]
    fwd_bwd(impl, make_inputs(*WARMUP_SHAPE, dt, "cpu"))()  # load libraries and start threads first
    x = make_inputs(int(B), int(T), int(H), int(V), dt, "cpu")
    _release_free_heap()
    print(peak_mem_mib(fwd_bwd(impl, x), "cpu"))


def _release_free_heap() -> None:
    """Hand memory freed by the warm-up and by making the inputs back to the OS (glibc keeps freed chunks
    under its mmap threshold, up to 32 MiB each, resident); else the measured step reuses them unseen and
    its extra peak reads too low at small shapes."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


# ---- main --------------------------------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def run_shape(B, T, H, V, dtype: str, impls: list[str], device: str, reps: int) -> list[list[object]]:
    shape = f"B{B} T{T} H{H} V{V}"
    x = make_inputs(B, T, H, V, DTYPES[dtype], device)
    N = B * T
    floor_flop = 6 * N * H * V
    res: dict[str, dict] = {}
    ref_grads = None  # (hidden.grad, weight.grad) of the first implementation that ran: plain when asked for
    for impl in sorted(impls, key=lambda i: i != "plain"):
        call = fwd_bwd(impl, x)
        try:
            loss = float(call())
        except Exception as e:  # e.g. Liger not installed, or not runnable on this device
            res[impl] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"}
            print(f"[{shape} {dtype}] {impl}: cannot run: {res[impl]['error']}")
            continue
        grads = (x["hidden"].grad.detach().clone(), x["weight"].grad.detach().clone())
        if ref_grads is None:
            ref_grads, ref_name = grads, impl
            grad_err = None
        else:
            grad_err = (_rel(grads[0], ref_grads[0]), _rel(grads[1], ref_grads[1]))
        del grads
        ms = time_ms(call, device, reps=reps)
        if device == "cuda":
            mem = peak_mem_mib(call, device)
        else:
            mem = peak_mem_mib_fresh_process(__file__, [impl, str(B), str(T), str(H), str(V), dtype])
        res[impl] = {"ms": ms, "mem": mem, "loss": loss, "grad_err": grad_err}
        print(f"[{shape} {dtype}] {impl}: {ms:.1f} ms, {mem:.0f} MiB extra peak, loss {loss:.7f}", flush=True)
    del ref_grads

    # agreement of the loss (and, for information, the gradients) with the plain loss
    base = "plain" if "ms" in res.get("plain", {}) else next((i for i in impls if "ms" in res[i]), None)
    for impl in impls:
        r = res[impl]
        if "ms" not in r or impl == base:
            continue
        rel = abs(r["loss"] - res[base]["loss"]) / max(abs(res[base]["loss"]), 1e-30)
        verdict = "OK" if rel < LOSS_RTOL[dtype] else "MISMATCH"
        gtxt = ""
        if r["grad_err"] is not None:
            gtxt = f"; grad rel. error vs {ref_name}: hidden {r['grad_err'][0]:.1e}, weight {r['grad_err'][1]:.1e}"
        print(f"[{shape} {dtype}] loss {impl} vs {base}: rel. diff {rel:.1e} (< {LOSS_RTOL[dtype]:g}: {verdict}){gtxt}")

    grad_mib = sum(x[k].numel() * x[k].element_size() for k in ("hidden", "weight")) / 2**20
    rows = []
    for impl in impls:
        r = res[impl]
        if "ms" not in r:
            row = [impl, shape, dtype, "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", f"cannot run: {r['error']}"]
            rows.append(row + (["n/a"] * 3 if device == "cuda" else []))
            continue
        plain_mem = res.get("plain", {}).get("mem")
        liger_ms = res.get("liger", {}).get("ms")
        work = r["mem"] - grad_mib  # what the loss needs beyond the two gradients every implementation returns
        plain_work = plain_mem - grad_mib if plain_mem else None
        row = [
            impl, shape, dtype, r["ms"], r["mem"],
            f"{r['mem'] / plain_mem:.2f}x" if plain_mem else "n/a",
            work,
            f"{work / plain_work:.2f}x" if plain_work else "n/a",
            f"{r['ms'] / liger_ms:.2f}x" if liger_ms else "n/a",
            f"{r['loss']:.7f}",
        ]  # fmt: skip
        floor_ms = floor_flop / (H100_BF16_TFLOPS * 1e12) * 1e3
        row += [floor_flop / r["ms"] / 1e9, floor_ms, floor_ms / r["ms"]]
        rows.append(row)
    return rows


def interleaved(B, T, H, V, dtypes: list[str], impls: list[str], device: str, rounds: int) -> None:
    """Timings robust to a shared, noisy machine: each round calls every implementation once, in turn, so a
    neighbour's load shifts all of a round alike; per round the ratio of each to the last implementation
    (e.g. ``--impls r1k,r1k_two_pass,liger``: to Liger), then the median over rounds. Wall time and this
    process's CPU time (all threads) both."""
    rows = []
    for dtype in dtypes:
        x = make_inputs(B, T, H, V, DTYPES[dtype], device)
        calls = {impl: fwd_bwd(impl, x) for impl in impls}
        for call in calls.values():  # warm-up: libraries, thread pools, allocator
            call()
        wall: dict[str, list[float]] = {i: [] for i in impls}
        cpu: dict[str, list[float]] = {i: [] for i in impls}
        for r in range(rounds):
            for impl, call in calls.items():
                w0, c0 = time.perf_counter(), time.process_time()
                call()
                wall[impl].append(time.perf_counter() - w0)
                cpu[impl].append(time.process_time() - c0)
            base = impls[-1]
            line = ", ".join(f"{i} {wall[i][-1]:.2f} s ({wall[i][-1] / wall[base][-1]:.2f}x)" for i in impls)
            print(f"[{dtype}] round {r}: {line}", flush=True)
        base = impls[-1]
        for impl in impls:
            ratios = [a / b for a, b in zip(wall[impl], wall[base], strict=True)]
            cpu_ratios = [a / b for a, b in zip(cpu[impl], cpu[base], strict=True)]
            rows.append([impl, f"B{B} T{T} H{H} V{V}", dtype, rounds, statistics.median(wall[impl]),
                         min(wall[impl]), " ".join(f"{q:.2f}" for q in ratios), statistics.median(ratios),
                         statistics.median(cpu_ratios)])  # fmt: skip
    print()
    print(f"device: {device_name(device)}; forward + backward of the GRPO loss (beta={BETA}, eps={EPSILON}, "
          f"loss_type={loss_type()}), {rounds} interleaved rounds; ratios to {impls[-1]}")  # fmt: skip
    header = ["impl", "shape", "dtype", "rounds", "median s", "best s", f"per-round / {impls[-1]}",
              f"median / {impls[-1]}", f"median CPU-time / {impls[-1]}"]  # fmt: skip
    write_table(f"grpo_{device}_rounds", header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=8, help="sequences")
    parser.add_argument("--T", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--H", type=int, default=1024, help="hidden size")
    parser.add_argument("--V", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--dtype", default="fp32", help="comma list of " + ", ".join(DTYPES))
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma list of " + ", ".join(LOSS_FNS))
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions on the CPU (best is kept)")
    parser.add_argument("--loss-type", choices=LOSS_TYPES, default="grpo")
    rounds_help = "CPU: instead of best-of timings, ROUNDS rounds of one call per impl in turn (ratios to the last)"
    parser.add_argument("--rounds", type=int, default=0, help=rounds_help)
    parser.add_argument("--mem-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["R1K_BENCH_LOSS_TYPE"] = args.loss_type
    if args.mem_child:
        return _mem_child(*args.mem_child)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for name, bad in (("impls", set(impls) - set(LOSS_FNS)), ("dtype", set(dtypes) - set(DTYPES))):
        if bad:
            parser.error(f"unknown {name}: {sorted(bad)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(args.B, args.T, args.H, args.V)]
    if device == "cuda" and (args.H, args.V) != GPU_EXTRA_SHAPE:
        shapes.append((args.B, args.T, *GPU_EXTRA_SHAPE))
    header = ["impl", "shape", "dtype", "ms", "extra peak MiB", "peak vs plain", "working MiB", "working vs plain",
              "time vs liger", "loss", "TFLOP/s (6NHV)", "floor ms (H100)", "floor/achieved"]  # fmt: skip
    if args.rounds:
        return interleaved(args.B, args.T, args.H, args.V, dtypes, impls, device, args.rounds)
    rows = []
    for B, T, H, V in shapes:
        for dtype in dtypes:
            rows += run_shape(B, T, H, V, dtype, impls, device, args.reps)
    timing = "do_bench median" if device == "cuda" else f"best of {args.reps}"
    note = (
        f"device: {device_name(device)}; forward + backward of the GRPO loss (beta={BETA}, eps={EPSILON}, "
        f"loss_type={loss_type()}), {timing} (grpo_loss computes its gradients in the forward, so a "
        "forward / backward split says nothing here). Extra peak MiB: over the inputs, including hidden.grad and "
        "weight.grad; peak vs plain / time vs liger: this row's value divided by plain's / liger's (< 1: less / "
        "faster); working MiB: extra peak minus the bytes of hidden.grad and weight.grad. Floor: 6*N*H*V FLOPs "
        f"at {H100_BF16_TFLOPS:g} TFLOP/s (H100 SXM dense bf16); r1k's single-pass path (GPU) does 6*N*H*V, the "
        "two-pass path (GSPO on the GPU; every dtype on the CPU, where it is the faster form) 8*N*H*V, less the "
        "padding tokens' rows on the CPU (weight 0: left out of both passes; ~20% of these batches' tokens)"
    )
    plot = Plot(("shape", "dtype"), "impl", "ms", "GRPO loss forward + backward, ms (lower is better)")
    write_table(f"grpo_{device}", header, rows, plot, note=note)


if __name__ == "__main__":
    main()
