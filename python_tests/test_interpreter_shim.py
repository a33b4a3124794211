"""The interpreter shim fixes real defects: each test shows the defect with the shim removed and the
correct result with it installed. Interpreter-only (the GPU path does not use the shim)."""

import numpy as np
import pytest
import torch
from conftest import HAS_GPU

from r1kernels import _interpreter_shim

pytestmark = pytest.mark.skipif(HAS_GPU, reason="the shim patches Triton's CPU interpreter only")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    idx = tl.arange(0, N)
    a = tl.load(a_ptr + idx[:, None] * N + idx[None, :])
    b = tl.load(b_ptr + idx[:, None] * N + idx[None, :])
    tl.store(c_ptr + idx[:, None] * N + idx[None, :], tl.dot(a, b))


@triton.jit
def _cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
    idx = tl.arange(0, N)
    tl.store(y_ptr + idx, tl.load(x_ptr + idx).to(y_ptr.dtype.element_ty))


@pytest.fixture
def without_shim():
    _interpreter_shim.uninstall()
    yield
    _interpreter_shim.install()


def _bf16_dot_error() -> float:
    a, b = torch.randn(16, 16).bfloat16(), torch.randn(16, 16).bfloat16()
    c = torch.full((16, 16), float("nan"))
    _dot_kernel[(1,)](a, b, c, N=16)
    ref = a.double() @ b.double()
    return float((c.double() - ref).norm() / ref.norm())


def test_bf16_dot_is_garbage_without_shim(without_shim):
    assert not _interpreter_shim.installed()
    assert not _bf16_dot_error() < 1e-3


def test_bf16_dot_is_exact_products_with_shim():
    assert _interpreter_shim.installed()
    assert _bf16_dot_error() < 1e-6


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=dtype)
    _cast_kernel[(1,)](x, y, N=x.numel())
    return y


def _ties() -> torch.Tensor:
    # midpoints between neighbouring e4m3 values: ties that must round to even
    codes = torch.arange(0, 0x7E, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return ((codes[1:] + codes[:-1]) / 2)[:64]


def test_fp8_cast_rounds_wrong_without_shim(without_shim):
    x = _ties()
    assert not torch.equal(_cast(x, torch.float8_e4m3fn).view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))


def test_fp8_casts_are_exact_with_shim():
    x = torch.cat([_ties(), torch.tensor([1000.0, -1000.0, float("nan"), 0.0])])
    x = torch.cat([x, torch.randn(128 - x.numel()) * 10])
    expected = torch.where(x.isnan(), x, x.clamp(-448, 448)).to(torch.float8_e4m3fn)
    assert torch.equal(_cast(x, torch.float8_e4m3fn).view(torch.uint8), expected.view(torch.uint8))
    back = _cast(expected, torch.float32)
    assert torch.equal(back.nan_to_num(7.0), expected.float().nan_to_num(7.0))


def test_bf16_cast_rounds_to_nearest_even_with_shim():
    x = torch.randn(256) * torch.logspace(-5, 5, 256)
    assert torch.equal(_cast(x, torch.bfloat16), x.bfloat16())


def test_bf16_cast_truncates_without_shim(without_shim):
    x = torch.randn(256)
    assert not torch.equal(_cast(x, torch.bfloat16), x.bfloat16())


def test_install_is_idempotent():
    before = _interpreter_shim._saved.copy()
    _interpreter_shim.install()
    assert _interpreter_shim._saved == before
    assert isinstance(np.float32(1), np.floating)
