"""Backend choice: env var, context manager, and clear errors for impossible requests."""

import contextlib

import pytest
import torch

import r1kernels
from r1kernels import backend


def test_default_cpu_tensors_use_cpu_path():
    assert backend.resolve(torch.device("cpu"), "op") == "cpu"


@pytest.mark.parametrize("where", ["default", "env", "scoped"])
@pytest.mark.parametrize("name", ["auto", "cpu", "triton"])
def test_on_cpu_answers_as_resolve(where, name, monkeypatch):
    """The ops' shortcut (flags in the usual case) gives resolve's answer whichever way a backend is asked for."""
    t = torch.randn(2)
    if where == "env":
        monkeypatch.setenv("R1K_BACKEND", name)
    with r1kernels.use_backend(name) if where == "scoped" else contextlib.nullcontext():
        want = "cpu" if where == "default" or name != "triton" else "triton"
        assert backend.resolve(t.device, "op") == want
        assert backend.on_cpu(t, "op") == (want == "cpu")


def test_context_manager_overrides_env(monkeypatch):
    monkeypatch.setenv("R1K_BACKEND", "cpu")
    assert backend.requested_backend() == "cpu"
    with r1kernels.use_backend("triton"):
        assert backend.requested_backend() == "triton"
    assert backend.requested_backend() == "cpu"


def test_unknown_backend_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"), r1kernels.use_backend("tpu"):
        pass
    monkeypatch.setenv("R1K_BACKEND", "rocm")
    with pytest.raises(ValueError, match="got 'rocm'"):
        backend.requested_backend()


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with r1kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.resolve(torch.device("cpu"), "quantize")


def test_cuda_backend_on_cpu_tensors_is_an_error():
    with r1kernels.use_backend("cuda"), pytest.raises(RuntimeError, match="CPU tensors"):
        r1kernels.fp8.quantize_per_token_group(torch.randn(2, 128))


def test_extension_is_built():
    from r1kernels._ext import ext

    assert hasattr(ext(), "quantize_fp8_tiles_cpu")
