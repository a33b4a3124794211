"""Train the tiny DeepSeek-V3 with GRPO on the addition task (``deepseek_grpo``), logging as it goes.

    python -m r1kernels.train [--steps 150] [--warmup-steps 60] [--out runs/NAME] [--resume CHECKPOINT]
                              [--backend auto|cpu|triton]
    torchrun --nproc_per_node 2 -m r1kernels.train ...   # data + expert parallel (gloo on a CPU, NCCL on GPUs)

``--backend triton`` without a GPU runs the Triton kernels in Triton's interpreter (slow: use a few steps).

Writes under ``--out`` (default: a new folder under ``runs/``): ``metrics.jsonl`` (one line per step: reward,
format reward, accuracy, KL, loss, clip fraction, entropy, completion length, routing balance, reference
error), ``curves.png`` (reward, accuracy, KL, entropy, completion length, top to bottom), ``checkpoint.pt``
(every ``--checkpoint-every`` steps and at the end; ``--resume`` continues it) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import torch

from r1kernels.train.deepseek_grpo import Config, Trainer, summarize
from r1kernels.train.plot import line_plot

PLOTTED = ("reward", "accuracy", "kl", "entropy", "completion_length")


def _out_dir(out: str | None) -> str:
    if out is None:
        out = os.path.join("runs", time.strftime("grpo-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    return out


def _progress(step: int, total: int, record: dict, t0: float) -> None:
    done = int(30 * (step + 1) / total)
    line = (f"\r[{'#' * done}{'.' * (30 - done)}] {step + 1}/{total} reward {record['reward']:.3f} "
            f"acc {record['accuracy']:.3f} kl {record['kl']:.3f} {time.perf_counter() - t0:.0f}s")  # fmt: skip
    sys.stdout.write(line)
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Config()
    parser.add_argument("--steps", type=int, default=150, help="GRPO steps")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--prompts", type=int, default=defaults.prompts)
    parser.add_argument("--group", type=int, default=defaults.group)
    parser.add_argument("--grpo-lr", type=float, default=defaults.grpo_lr)
    parser.add_argument("--check-every", type=int, default=defaults.check_every)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", default=None)
    parser.add_argument("--resume", default=None, help="a checkpoint.pt to continue")
    parser.add_argument("--backend", choices=("auto", "cpu", "triton"), default="auto")
    parser.add_argument("--fp8", action="store_true",
                        help="DeepSeek-V3's FP8 recipe: routed experts and every block linear")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--reference-reset-every", type=int, default=0)
    args = parser.parse_args(argv)
    if args.backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # the interpreter must be on before triton is first imported (the r1kernels package already did):
        # run again in a process that has it on
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        cmd = [sys.executable, "-m", "r1kernels.train", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env).returncode
    import r1kernels

    if args.backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        from r1kernels import _interpreter_shim

        _interpreter_shim.install()
    with r1kernels.use_backend(args.backend):
        return _run(args)


def _checkpoint_path(out: str, rank: int) -> str:
    return os.path.join(out, "checkpoint.pt" if rank == 0 else f"checkpoint.rank{rank}.pt")


def _run(args) -> int:
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():  # under torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    say = print if rank == 0 else (lambda *a, **k: None)  # one process writes the logs
    defaults = Config()
    cfg = dataclasses.replace(defaults, steps=args.steps, warmup_steps=args.warmup_steps, prompts=args.prompts,
                              group=args.group, grpo_lr=args.grpo_lr, check_every=args.check_every,
                              seed=args.seed, dtype=args.dtype, reference_reset_every=args.reference_reset_every,
                              max_new_tokens=args.max_new_tokens,
                              model=dataclasses.replace(defaults.model, fp8=args.fp8))  # fmt: skip
    out = _out_dir(args.out) if rank == 0 else args.out
    if dist.is_initialized():  # every rank needs rank 0's folder for its checkpoint shard
        box = [out]
        dist.broadcast_object_list(box)
        out = box[0]
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    if args.resume:
        path = args.resume if rank == 0 else args.resume.replace("checkpoint.pt", f"checkpoint.rank{rank}.pt")
        trainer.load_state_dict(torch.load(path, weights_only=False))
        say(f"resumed at step {trainer.step} from {args.resume}")
    else:
        say(f"warm-up ({cfg.warmup_steps} steps, {trainer.world} process(es)) ...", flush=True)
        warm_loss, warm_pass = trainer.warmup(), trainer.evaluate()
        say(f"warm-up loss {warm_loss:.3f}; pass@1 on held-out problems {warm_pass:.3f}")
    metrics = open(os.path.join(out, "metrics.jsonl"), "a") if rank == 0 else None  # noqa: SIM115
    try:
        while trainer.step < cfg.steps:
            record = trainer.grpo_step()
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                _progress(trainer.step - 1, cfg.steps, record, t0)
            if trainer.step % args.checkpoint_every == 0:
                torch.save(trainer.state_dict(), _checkpoint_path(out, rank))
    finally:
        if metrics is not None:
            metrics.close()
    say()
    torch.save(trainer.state_dict(), _checkpoint_path(out, rank))
    summary = summarize(trainer, time.perf_counter() - t0)
    summary.pop("history")
    summary["pass_at_1"] = trainer.evaluate()
    summary["processes"] = trainer.world
    summary["curves_png_panels"] = list(PLOTTED)
    if rank == 0:
        line_plot(os.path.join(out, "curves.png"), {k: [h[k] for h in trainer.history] for k in PLOTTED})
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    say(f"reward (mean of 10 steps) {summary['first_reward']:.3f} -> {summary['last_reward']:.3f}; held-out pass@1 "
        f"{summary['pass_at_1']:.3f}; worst float64-reference error {summary['worst_reference_error']:.1e}; "
        f"{summary['seconds']:.0f} s; logs in {out}")  # fmt: skip
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
