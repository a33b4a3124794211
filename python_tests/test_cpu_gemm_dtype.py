"""The CPU path picks the dtype of its gradient GEMMs for bf16 inputs from the CPU it runs on
(``r1kernels.cpu_caps``): both choices give the reference gradients, the override is honoured both ways and a
bad one refused, the detection follows the CPU's flags and oneDNN, and the description names the choice."""

import os

import pytest
import torch

import r1kernels
from r1kernels import cpu_caps
from r1kernels.grpo import lm_head_cpu, token_logprob_stats
from r1kernels.grpo import reference as ref

BF16_GRAD_TOL = 1.5e-2  # as python_tests/test_grpo_token_logprobs.py


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert not torch.isnan(a).any(), "NaN in output"
    return float((a - b).norm() / b.norm())


@pytest.fixture
def blocked_path(monkeypatch):
    """Send small problems to the blocked loops, the form of the CPU path where the GEMM dtype is chosen, and
    record the dtypes of the gradient GEMMs that run there (bf16 ``@``, fp32 ``addmm_``)."""
    monkeypatch.setattr(lm_head_cpu, "SMALL_LOGITS", 0)
    monkeypatch.setattr(lm_head_cpu, "TINY_MACS", 0, raising=False)
    monkeypatch.setattr(lm_head_cpu, "VOCAB_TILE", 128)  # several vocab tiles
    monkeypatch.setattr(lm_head_cpu, "CPU_SCRATCH_BYTES", 4 * 128 * 16)  # and several token chunks
    dtypes = {"matmul": [], "addmm_": []}
    matmul, addmm_ = torch.Tensor.__matmul__, torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: dtypes["matmul"].append(a.dtype) or matmul(a, b))
    monkeypatch.setattr(torch.Tensor, "addmm_",
                        lambda t, a, b, **kw: dtypes["addmm_"].append(a.dtype) or addmm_(t, a, b, **kw))  # fmt: skip
    return dtypes


@pytest.mark.parametrize("forced", ["1", "0"], ids=["bf16-gemms", "fp32-gemms"])
def test_both_gemm_dtypes_match_the_reference(monkeypatch, blocked_path, forced):
    """Gradients of logp and entropy (with a bias and a temperature) against float64 autograd."""
    monkeypatch.setenv("R1K_CPU_BF16_GEMM", forced)
    N, H, V = 70, 48, 300
    hidden = torch.randn(N, H).bfloat16().requires_grad_()
    weight = (torch.randn(V, H) * H**-0.5 * 2).bfloat16().requires_grad_()
    bias = (torch.randn(V) * 0.5).bfloat16().requires_grad_()
    ids = torch.randint(0, V, (N,))
    g, ge = torch.randn(N), torch.randn(N)
    with r1kernels.use_backend("cpu"):
        logp, _, entropy = token_logprob_stats(hidden, weight, ids, bias=bias, temperature=0.7, return_entropy=True)
        grads = torch.autograd.grad((logp * g + entropy * ge).sum(), (hidden, weight, bias))
    # the gradient GEMMs ran in the forced dtype: bf16 products, or fp32 ones on the upcast operands
    assert (torch.bfloat16 in blocked_path["matmul"]) == (forced == "1")
    assert bool(blocked_path["addmm_"]) == (forced == "0")
    assert all(dtype == torch.float32 for dtype in blocked_path["addmm_"])
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    r_logp, r_entropy = ref.token_logprobs(leaves[0], leaves[1], ids, leaves[2], 0.7)
    r_grads = torch.autograd.grad((r_logp * g.double() + r_entropy * ge.double()).sum(), leaves)
    for name, got, want in zip(("d hidden", "d weight", "d bias"), grads, r_grads, strict=True):
        assert got.dtype == torch.bfloat16
        assert _rel(got, want) < BF16_GRAD_TOL, f"{name}: rel. error {_rel(got, want):.2e}"


def test_both_gemm_dtypes_agree(monkeypatch, blocked_path):
    """The fp32 GEMMs differ from the bf16 ones only by the bf16 rounding of d logits and of the products."""
    hidden = torch.randn(64, 32).bfloat16().requires_grad_()
    weight = (torch.randn(400, 32) * 0.3).bfloat16().requires_grad_()
    ids = torch.randint(0, 400, (64,))
    grads = {}
    for forced in ("1", "0"):
        monkeypatch.setenv("R1K_CPU_BF16_GEMM", forced)
        with r1kernels.use_backend("cpu"):
            logp, _, _ = token_logprob_stats(hidden, weight, ids)
            grads[forced] = torch.autograd.grad(logp.sum(), (hidden, weight))
    for a, b in zip(grads["1"], grads["0"], strict=True):
        assert _rel(a, b) < 1e-2


def test_override_is_honoured_both_ways(monkeypatch):
    monkeypatch.setenv("R1K_CPU_BF16_GEMM", "0")
    monkeypatch.setattr(cpu_caps, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    assert not cpu_caps.fast_bf16_gemm()
    assert cpu_caps.bf16_gemm_path().startswith("fp32 GEMMs (forced by R1K_CPU_BF16_GEMM=0")
    monkeypatch.setenv("R1K_CPU_BF16_GEMM", "1")
    monkeypatch.setattr(cpu_caps, "cpu_flags", lambda: frozenset({"avx2"}))
    assert cpu_caps.fast_bf16_gemm()
    assert cpu_caps.bf16_gemm_path().startswith("bf16 GEMMs (forced by R1K_CPU_BF16_GEMM=1")
    monkeypatch.setenv("R1K_CPU_BF16_GEMM", "")  # empty: as unset
    assert not cpu_caps.fast_bf16_gemm()


@pytest.mark.parametrize("value", ["yes", "true", "2", "bf16"])
def test_bad_override_is_refused(monkeypatch, value):
    monkeypatch.setenv("R1K_CPU_BF16_GEMM", value)
    with pytest.raises(ValueError, match=rf"R1K_CPU_BF16_GEMM must be 1 .* or 0 .*, got '{value}'"):
        cpu_caps.fast_bf16_gemm()
    with pytest.raises(ValueError, match="R1K_CPU_BF16_GEMM must be"):
        cpu_caps.bf16_gemm_path()


def test_bad_override_is_refused_by_the_backward(monkeypatch, blocked_path):
    hidden = torch.randn(8, 16).bfloat16().requires_grad_()
    weight = torch.randn(200, 16).bfloat16()
    with r1kernels.use_backend("cpu"):
        logp, _, _ = token_logprob_stats(hidden, weight, torch.randint(0, 200, (8,)))
        monkeypatch.setenv("R1K_CPU_BF16_GEMM", "on")
        with pytest.raises(ValueError, match="R1K_CPU_BF16_GEMM"):
            logp.sum().backward()


@pytest.mark.parametrize(
    "flags,onednn,fast,reason",
    [
        ({"avx2", "fma3"}, True, False, "no native bf16"),  # an AVX2-only EPYC (Zen 3), the machine
        ({"avx2", "avx512_f", "avx512_bw"}, True, False, "no native bf16"),  # Skylake-X / Ice Lake
        ({"avx2", "avx512_f", "avx512_bf16"}, True, True, "avx512_bf16"),  # Zen 4, Cooper Lake
        ({"avx512_bf16", "amx_bf16", "amx_tile"}, True, True, "amx_bf16"),  # Sapphire Rapids
        ({"neon", "bf16"}, True, True, "bf16"),  # Arm with the BF16 extension
        ({"avx512_bf16"}, False, False, "this torch has no oneDNN bf16 GEMM"),
    ],
    ids=["avx2", "avx512", "avx512-bf16", "amx", "arm-bf16", "no-onednn"],
)
def test_detection(monkeypatch, flags, onednn, fast, reason):
    monkeypatch.delenv("R1K_CPU_BF16_GEMM", raising=False)
    monkeypatch.setattr(cpu_caps, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(cpu_caps, "_onednn_bf16_built", lambda: onednn)
    assert cpu_caps.fast_bf16_gemm() == fast
    description = cpu_caps.bf16_gemm_path()
    assert description.startswith("bf16 GEMMs (" if fast else "fp32 GEMMs (") and reason in description
    assert torch.backends.cpu.get_cpu_capability() in description


def test_onednn_switched_off_means_fp32(monkeypatch):
    monkeypatch.delenv("R1K_CPU_BF16_GEMM", raising=False)
    monkeypatch.setattr(cpu_caps, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(cpu_caps, "_onednn_bf16_built", lambda: True)
    assert cpu_caps.fast_bf16_gemm()
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # as a user may at run time
    assert not cpu_caps.fast_bf16_gemm() and "oneDNN is switched off" in cpu_caps.bf16_gemm_path()


def test_flags_of_this_cpu():
    """The real detection runs and names flags in the spelling NATIVE_BF16 uses (x86: avx2 and the like)."""
    flags = cpu_caps.cpu_flags()
    if torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        assert "avx2" in flags
    assert isinstance(cpu_caps.fast_bf16_gemm(), bool)


@pytest.mark.skipif(not hasattr(torch.cpu, "get_capabilities"), reason="this torch reads /proc/cpuinfo only")
@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo")
def test_proc_cpuinfo_fallback_agrees_with_torch(monkeypatch):
    """Without torch.cpu.get_capabilities (older torch) the flags come from /proc/cpuinfo, same bf16 verdict."""
    from_torch = cpu_caps.cpu_flags()
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    cpu_caps.cpu_flags.cache_clear()
    try:
        from_proc = cpu_caps.cpu_flags()
    finally:
        cpu_caps.cpu_flags.cache_clear()
    assert from_proc & set(cpu_caps.NATIVE_BF16) == from_torch & set(cpu_caps.NATIVE_BF16)
    assert ("avx2" in from_proc) == ("avx2" in from_torch)
