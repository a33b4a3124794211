"""The GRPO demo loop learns and every op matches its reference while it trains."""

import os
import subprocess
import sys

import pytest
from conftest import HAS_GPU

import r1kernels
from r1kernels.train.grpo_addition import Config, train


def test_loop_learns_with_reference_checks():
    summary = train(Config(steps=60, prompts=32, check_every=1, seed=1), log=lambda s: None)
    assert summary["worst_reference_error"] < 1e-3
    assert summary["last_reward"] > summary["first_reward"] + 0.3  # random policy scores ~0.1


def test_loop_runs_on_triton_kernels():
    device = "cuda" if HAS_GPU else "cpu"  # the interpreter on a CPU machine
    with r1kernels.use_backend("triton"):
        summary = train(
            Config(steps=2, prompts=4, group=4, hidden=32, check_every=1, device=device), log=lambda s: None
        )
    assert summary["worst_reference_error"] < 1e-3


def test_demo_entry_point(capsys):
    from r1kernels import demo

    assert demo.main(["--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "every op matched its reference" in out and "bitwise equal to reference: True" in out


@pytest.mark.skipif(HAS_GPU, reason="the interpreter path is for machines without a GPU")
def test_demo_triton_backend_from_a_fresh_process():
    """`python -m r1kernels.demo --backend triton` imports triton before main() runs: the demo must still get
    the interpreter (it re-runs itself with TRITON_INTERPRET=1)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "r1kernels.demo", "--steps", "2", "--backend", "triton"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "every op matched its reference" in out.stdout
