"""The CUDA C++ kernels build for sm_80 and sm_90a with the real build's ptxas flags, without spills or
local memory, and those flags really do reject a kernel that needs local memory."""

import shutil

import pytest

from r1kernels import compile_report

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


def test_every_cuda_kernel_builds_clean_for_sm80_and_sm90a():
    rows = compile_report.cuda_rows()
    assert {r.arch for r in rows} == set(compile_report.CUDA_ARCHS)
    assert all(":" in r.name.removeprefix("cuda:") for r in rows), "each kernel is listed by name"
    problems = {f"{r.name} {r.arch}": compile_report.check(r) for r in rows}
    assert not {k: v for k, v in problems.items() if v}
    vector_paths = [r for r in rows if "true>" in r.name]  # quantize_groups_kernel<dtype, VEC=true>
    assert vector_paths and all(r.vec16_global > 0 for r in vector_paths), "the vector path issues 16-byte loads"


def test_ptxas_flags_reject_local_memory(tmp_path, monkeypatch):
    (tmp_path / "bad.cu").write_text(
        "__global__ void uses_stack(float* out, const int* idx) {\n"
        "  float buf[256];\n"
        "  for (int i = 0; i < 256; ++i) buf[i] = out[i * threadIdx.x];\n"
        "  out[threadIdx.x] = buf[idx[threadIdx.x] & 255];\n"
        "}\n"
    )
    monkeypatch.setattr(compile_report, "CSRC", tmp_path)
    rows = compile_report.cuda_rows()
    assert len(rows) == len(compile_report.CUDA_ARCHS)
    assert all("Local memory" in r.error for r in rows)
    assert all(compile_report.check(r) for r in rows)
