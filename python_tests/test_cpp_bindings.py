"""The C++ module's interface: shared enums exported (not mirrored as integers), geometry as a named struct,
every function with named arguments, and one source for the CUDA build settings."""

from pathlib import Path

import pytest
import torch

from r1kernels import compile_report
from r1kernels._ext import cpp_dtype, ext

ROOT = Path(__file__).resolve().parent.parent


def test_dtype_enum_is_exported_and_mapped_from_torch():
    members = ext().DType.__members__
    assert set(members) == {"float32", "float16", "bfloat16"}
    assert cpp_dtype(torch.bfloat16) == ext().DType.bfloat16 and cpp_dtype(torch.float32) == ext().DType.float32
    with pytest.raises(TypeError, match=r"torch\.int32"):
        cpp_dtype(torch.int32)
    with pytest.raises(TypeError, match=r"torch\.float64"):
        cpp_dtype(torch.float64)


def test_tile_geometry_is_built_by_keyword():
    g = ext().TileGeometry(rows=3, cols=200, row_stride=256, tile_rows=1, tile_cols=128, scale_stride_r=2,
                           scale_stride_c=1)  # fmt: skip
    assert (g.rows, g.cols, g.row_stride, g.tile_rows, g.tile_cols, g.scale_stride_r, g.scale_stride_c) == (
        3, 200, 256, 1, 128, 2, 1)  # fmt: skip
    with pytest.raises(TypeError):
        ext().TileGeometry(3, 200, 256, 1, 128, 2, 1)  # positional integers are what this replaces


def test_bindings_take_named_arguments_only():
    x = torch.randn(2, 128)
    q = torch.empty(2, 128, dtype=torch.float8_e4m3fn)
    s = torch.empty(2, 1)
    g = ext().TileGeometry(rows=2, cols=128, row_stride=128, tile_rows=1, tile_cols=128, scale_stride_r=1,
                           scale_stride_c=1)  # fmt: skip
    ext().quantize_fp8_tiles_cpu(x=x.data_ptr(), dtype=cpp_dtype(x.dtype), geometry=g, out=q.data_ptr(),
                                 scales=s.data_ptr(), pow2=False)  # fmt: skip
    assert torch.equal(s[:, 0], x.abs().amax(1) / 448)
    with pytest.raises(TypeError):
        ext().quantize_fp8_tiles_cpu(x=x.data_ptr(), dtype=cpp_dtype(x.dtype), geometry=g, output=q.data_ptr(),
                                     scales=s.data_ptr(), pow2=False)  # fmt: skip
    with pytest.raises(TypeError):
        ext().quantize_fp8_tiles_cpu(x.data_ptr(), cpp_dtype(x.dtype), g, q.data_ptr(), s.data_ptr(), False)


def test_cuda_build_settings_have_one_source():
    settings = compile_report.cuda_build_settings()
    assert f"-Xptxas={settings['ptxas_flags']}" == compile_report.PTXAS_FLAGS
    assert [f"sm_{a}" for a in settings["archs"].split(";")] == list(compile_report.CUDA_ARCHS.values())
    for name in ("CMakeLists.txt", "setup.py"):
        text = (ROOT / name).read_text()
        assert "cuda_build.json" in text
        assert "-warn-spills" not in text and "90a" not in text, f"{name} repeats a build setting"


def test_cmake_finds_nested_family_folders():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert "GLOB_RECURSE R1K_CPU_SOURCES" in text and "GLOB_RECURSE R1K_CUDA_SOURCES" in text
