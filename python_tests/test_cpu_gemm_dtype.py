"""The CPU path picks its bf16 GEMM dtype from the CPU's capability (never the machine the code was written
on): both choices give reference gradients, the override works both ways, and a bad override is refused."""

import pytest
import torch

import r1kernels
from r1kernels import cpu_caps
from r1kernels.grpo import lm_head_cpu, token_logprob_stats
from r1kernels.grpo import reference as ref


@pytest.mark.parametrize("forced", ["0", "1"])
def test_both_gemm_dtypes_match_the_reference(monkeypatch, forced):
    monkeypatch.setenv("R1K_CPU_BF16_GEMM", forced)
    monkeypatch.setattr(lm_head_cpu, "SMALL_LOGITS", 0)  # the blocked path, where the choice is made
    calls = []
    real_mm = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append(a.dtype) or real_mm(a, b))
    hidden = torch.randn(40, 48).bfloat16().requires_grad_()
    weight = (torch.randn(300, 48) * 0.3).bfloat16().requires_grad_()
    ids = torch.randint(0, 300, (40,))
    g = torch.randn(40)
    with r1kernels.use_backend("cpu"):
        logp, _, _ = token_logprob_stats(hidden, weight, ids)
        grads = torch.autograd.grad((logp * g).sum(), (hidden, weight))
    assert (torch.bfloat16 in calls) == (forced == "1")  # the gradient GEMMs ran in the chosen dtype
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    r_logp, _ = ref.token_logprobs(leaves[0], leaves[1], ids)
    r_grads = torch.autograd.grad((r_logp * g.double()).sum(), leaves)
    for got, want in zip(grads, r_grads, strict=True):
        assert float((got.double() - want).norm() / want.norm()) < 1.5e-2


def test_override_and_description(monkeypatch):
    monkeypatch.setenv("R1K_CPU_BF16_GEMM", "0")
    assert not cpu_caps.fast_bf16_gemm() and cpu_caps.bf16_gemm_path().startswith("fp32 GEMMs")
    monkeypatch.setenv("R1K_CPU_BF16_GEMM", "1")
    assert cpu_caps.fast_bf16_gemm() and "forced" in cpu_caps.bf16_gemm_path()
    monkeypatch.setenv("R1K_CPU_BF16_GEMM", "yes")
    with pytest.raises(ValueError, match="R1K_CPU_BF16_GEMM must be 0 or 1"):
        cpu_caps.fast_bf16_gemm()


def test_detection_follows_the_cpu_flags(monkeypatch):
    monkeypatch.delenv("R1K_CPU_BF16_GEMM", raising=False)
    monkeypatch.setattr(cpu_caps, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))  # an AVX2-only EPYC
    assert not cpu_caps.fast_bf16_gemm() and "no native bf16" in cpu_caps.bf16_gemm_path()
    monkeypatch.setattr(cpu_caps, "_cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert cpu_caps.fast_bf16_gemm()
