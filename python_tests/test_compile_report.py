"""Every registered Triton kernel compiles for sm_80, sm_89 and sm_90a (no GPU needed) without spills,
within shared memory, matrix kernels on wgmma on sm_90a, memory-bound kernels with 16-byte accesses."""

import pytest

from r1kernels import compile_report
from r1kernels.compile_registry import ARCH_NAMES, ARCHS, all_variants


@pytest.fixture(scope="module")
def rows():
    # In a subprocess: this test session may run Triton in interpreter mode.
    return compile_report.run_in_subprocess()


def test_every_kernel_builds_for_every_arch(rows):
    built = {(r.name, r.arch) for r in rows}
    for arch in ARCHS:
        names = {v.name for v in all_variants(arch)}  # variant names need no compiled kernel
        assert names, f"no kernels registered for {ARCH_NAMES[arch]}"
        assert {(n, arch) for n in names} <= built


def test_no_spills_smem_within_limits_and_wgmma_on_hopper(rows):
    problems = {f"{r.name} {ARCH_NAMES[r.arch]}": compile_report.check(r) for r in rows}
    assert not {k: v for k, v in problems.items() if v}
    print("\n" + compile_report.format_table(rows))


def test_memory_bound_kernels_use_16_byte_accesses(rows):
    slow = [f"{r.name} {ARCH_NAMES[r.arch]}" for r in rows if r.kind == "memory" and r.vec16_global == 0]
    assert not slow


def test_check_flags_spills_and_missing_wgmma():
    bad = compile_report.CompileRow("k", 90, "matrix", 40, 16, 8, 1000, "HMMA", 0, 0, 0)
    problems = " ".join(compile_report.check(bad))
    assert "spills" in problems and "warpgroup MMA" in problems
    over = compile_report.CompileRow("k", 89, "memory", 40, 0, 0, 200_000, "-", 0, 4, 0)
    assert "over the sm_89 limit" in " ".join(compile_report.check(over))
    wraps = compile_report.CompileRow("k", 80, "memory", 40, 0, 0, 0, "-", 0, 4, 0, i32_index_products=2)
    assert "int32 index x stride" in " ".join(compile_report.check(wraps))


def test_cli_prints_table(capsys):
    assert compile_report.main(["--arch", "90", "--filter", "per_block"]) == 0
    out = capsys.readouterr().out
    assert "fp8.quantize_per_block" in out and "sm_90a" in out


def test_tma_variants_issue_bulk_tensor_copies(rows):
    tma_rows = [r for r in rows if ",tma" in r.name]
    assert tma_rows and all(r.arch == 90 for r in tma_rows)
    assert all(r.tma > 0 for r in tma_rows), [r.name for r in tma_rows if r.tma == 0]
