"""The benchmark helpers (rotation, forward / backward timing, floors, tables and plots) and the committed CPU
report's freshness: it records a digest of the kernel sources, which must match the current ones."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402


def test_committed_cpu_report_matches_the_kernel_sources():
    report = BENCH / "results" / "REPORT_cpu.md"
    assert report.exists(), "benchmarks/results/REPORT_cpu.md is missing: run python benchmarks/run_all.py"
    found = re.search(r"kernel sources ([0-9a-f]{16})", report.read_text())
    assert found, "REPORT_cpu.md has no kernel-sources digest: regenerate it with benchmarks/run_all.py"
    assert found.group(1) == common.kernel_sources_digest(), (
        "kernels changed since benchmarks/results/REPORT_cpu.md was generated: rerun python benchmarks/run_all.py "
        "(or --only <stems> for the families you changed) and commit benchmarks/results/"
    )


def test_digest_sees_a_kernel_change(tmp_path, monkeypatch):
    (tmp_path / "r1kernels" / "fam" / "kernels").mkdir(parents=True)
    (tmp_path / "csrc" / "fam").mkdir(parents=True)
    kernel = tmp_path / "r1kernels" / "fam" / "kernels" / "k.py"
    kernel.write_text("a = 1\n")
    (tmp_path / "csrc" / "fam" / "k.cu").write_text("// cuda\n")
    (tmp_path / "r1kernels" / "fam" / "launcher.py").write_text("b = 1\n")
    monkeypatch.setattr(common, "REPO", tmp_path)
    before = common.kernel_sources_digest()
    (tmp_path / "r1kernels" / "fam" / "launcher.py").write_text("b = 2\n")  # not a kernel
    assert common.kernel_sources_digest() == before
    kernel.write_text("a = 2\n")
    assert common.kernel_sources_digest() != before


def test_rotations_evict_l2_on_a_gpu_only():
    make = lambda: (torch.randn(2),)
    mib = 2**20
    assert len(common.rotations(make, 10 * mib, "cpu")) == 1
    # copies enough to cover twice the 50 MiB L2, plus the one being read, at most 8
    assert [len(common.rotations(make, n * mib, "cuda")) for n in (10, 40, 200)] == [8, 4, 2]
    copies = common.rotations(make, 40 * mib, "cuda")
    assert len({id(c[0]) for c in copies}) == 4  # separate tensors, not one repeated


def test_time_fwd_bwd_rotates_inputs_and_runs_the_backward():
    seen = []
    inputs = [(torch.randn(8, requires_grad=True),) for _ in range(3)]

    def forward(x):
        seen.append(x)
        return (x * 2).sum()

    fwd, bwd, both = common.time_fwd_bwd(forward, inputs, "cpu", reps=2)
    assert fwd > 0 and both >= fwd and bwd == pytest.approx(both - fwd)
    assert {id(x) for x in seen} == {id(x) for (x,) in inputs}
    for (x,) in inputs:
        assert x.grad is not None and torch.equal(x.grad, torch.full_like(x, 2.0))


def test_write_table_writes_markdown_csv_note_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    rows = [["a", "r1k", 1.5], ["a", "peer", 3.0], ["b", "r1k", ""]]
    md = common.write_table("t_cpu", ["case", "impl", "ms"], rows, common.Plot(("case",), "impl", "ms"), note="n")
    assert md.startswith("n\n\n| case | impl | ms |")
    assert (tmp_path / "t_cpu.csv").read_text().splitlines()[1] == "a,r1k,1.5"
    pytest.importorskip("matplotlib")
    assert (tmp_path / "t_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_floors():
    assert common.flops_floor_ms(989e12, common.H100_BF16_TFLOPS) == pytest.approx(1e3)
    assert common.bytes_floor_ms(3.35e12) == pytest.approx(1e3)
