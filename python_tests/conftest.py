"""Test setup: without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, which
must be switched on before triton is imported. With a GPU the same tests run the compiled kernels."""

import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from r1kernels import _alloc, _interpreter_shim  # noqa: E402
from r1kernels._ext import has_cuda_kernels  # noqa: E402


def pytest_report_header(config):
    where = "compiled on " + torch.cuda.get_device_name() if HAS_GPU else "Triton interpreter on CPU"
    return f"r1kernels: Triton kernels {where}; CUDA C++ kernels built: {has_cuda_kernels()}"


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs every run; the seed is printed so a failure can be replayed with R1K_SEED."""
    seed = int(os.environ.get("R1K_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    print(f"R1K_SEED={seed}")
    yield seed


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every output a launcher allocates starts as NaN / 0xFF bytes."""
    _alloc.set_poison(True)
    yield
    _alloc.set_poison(False)


@pytest.fixture
def kernel_device() -> str:
    """Where the Triton kernels run in this session."""
    return "cuda" if HAS_GPU else "cpu"


def backends_for(op_has_cuda_kernel: bool = False) -> list:
    """Backends to test an op on, as (backend, device) pairs: Triton always (interpreter or GPU), the C++
    CPU path always, the CUDA C++ kernel when built and a GPU is present."""
    out = [pytest.param("triton", "cuda" if HAS_GPU else "cpu", id="triton"), pytest.param("cpu", "cpu", id="cpu")]
    if op_has_cuda_kernel:
        marks = pytest.mark.skipif(not (HAS_GPU and has_cuda_kernels()), reason="needs a GPU and the CUDA build")
        out.append(pytest.param("cuda", "cuda", id="cuda", marks=marks))
    return out


if not HAS_GPU:
    _interpreter_shim.install()
