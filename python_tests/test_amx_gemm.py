"""The AMX bf16 -> fp32 GEMM (csrc/common/amx_bf16_gemm.cpp): results against float64 at tile edges, only
c's own rows and columns written, NaN propagated, the packed layout, and the CPU LM-head path running its
logits GEMMs on it (where this machine has AMX) with the same results as the fp32-copy path."""

import pytest
import torch

import r1kernels
from r1kernels import cpu_caps
from r1kernels._ext import ext
from r1kernels.grpo import lm_head_cpu, token_logprob_stats
from r1kernels.grpo import reference as ref

needs_amx = pytest.mark.skipif(not ext().amx_bf16_usable(), reason="this CPU / OS has no usable AMX-BF16")


def _pack(b: torch.Tensor) -> torch.Tensor:
    n, k = b.shape
    packed = torch.full((ext().amx_packed_b_words(n=n, k=k),), -1, dtype=torch.int32)  # poisoned
    ext().amx_pack_b_nt(b=b.data_ptr(), ldb=b.stride(0), n=n, k=k, packed=packed.data_ptr())
    return packed


def _gemm(a: torch.Tensor, b: torch.Tensor, bias, alpha: float, extra_cols: int = 0) -> torch.Tensor:
    """c [m, n + extra_cols] poisoned with NaN; the GEMM writes its first n columns."""
    (m, k), n = a.shape, b.shape[0]
    packed = _pack(b)
    c = torch.full((m, n + extra_cols), float("nan"))
    ext().amx_bf16_gemm_nt(a=a.data_ptr(), lda=a.stride(0), m=m, packed_b=packed.data_ptr(), n=n, k=k,
                           bias=0 if bias is None else bias.data_ptr(), alpha=alpha, c=c.data_ptr(),
                           ldc=c.stride(0))  # fmt: skip
    return c


def test_packed_layout():
    """16-column panels of (b[j][2i], b[j][2i + 1]) pairs, zero past n (to 32 columns) and past k (to 32)."""
    n, k = 5, 3
    b = torch.randint(1, 2**15, (n, k), dtype=torch.int16).view(torch.bfloat16)
    words = _pack(b).view(-1, 16, 16)  # [panels * pairs, 16 columns] per panel: pairs rows of 16 words
    assert words.numel() == 32 * 32 // 2
    bits = b.view(torch.int16).to(torch.int32) & 0xFFFF
    padded = torch.zeros(32, 32, dtype=torch.int32)
    padded[:n, :k] = bits
    want = (padded[:, 0::2] | (padded[:, 1::2] << 16)).T  # [pairs, 32 columns]
    got = torch.cat([words.view(2, 16, 16)[p] for p in range(2)], dim=1)  # panels side by side
    assert torch.equal(got, want)


@needs_amx
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (5, 17, 40), (33, 70, 100), (100, 33, 31), (64, 130, 256)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_gemm_matches_float64(m, n, k, with_bias):
    a = torch.randn(m, k + 9).bfloat16()[:, 4 : 4 + k]  # row stride k + 9: a strided operand
    b = torch.randn(n, k).bfloat16()
    bias = torch.randn(n) if with_bias else None
    c = _gemm(a, b, bias, 0.7, extra_cols=3)
    want = a.double() @ b.double().T + (0 if bias is None else bias.double())
    want *= 0.7
    # fp32 sums of exact products: error within a few ulps of the sum of magnitudes
    bound = 4 * k * 2.0**-24 * 0.7 * (a.double().abs() @ b.double().abs().T) + 1e-6
    assert not torch.isnan(c[:, :n]).any(), "NaN in output"
    assert ((c[:, :n].double() - want).abs() <= bound).all()
    assert torch.isnan(c[:, n:]).all(), "wrote past the last column"


@needs_amx
def test_nan_propagates_to_its_row_and_column():
    a, b = torch.randn(40, 64).bfloat16(), torch.randn(50, 64).bfloat16()
    a[3, 7] = float("nan")
    b[11, 60] = float("inf")
    c = _gemm(a, b, None, 1.0)
    assert torch.isnan(c[3]).all()
    rows = [r for r in range(40) if r != 3]
    assert not torch.isfinite(c[rows, 11]).any()
    others = [j for j in range(50) if j != 11]
    assert torch.isfinite(c[rows][:, others]).all()


class _CountingExt:
    """ext() with its AMX GEMM calls counted."""

    def __init__(self):
        self.gemms = 0

    def __getattr__(self, name):
        return getattr(ext(), name)

    def amx_bf16_gemm_nt(self, **kw):
        self.gemms += 1
        return ext().amx_bf16_gemm_nt(**kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_lm_head_logits_on_amx_match_the_fp32_copies(monkeypatch, dtype):
    """Blocked CPU path (several vocab tiles and token chunks, bias, temperature): the AMX logits GEMM runs for
    bf16 where usable, never for fp32, and log-probs / entropy / gradients equal the fp32-copy path's to fp32
    rounding and float64's to the bf16 tolerance."""
    monkeypatch.setattr(lm_head_cpu, "SMALL_LOGITS", 0)
    monkeypatch.setattr(lm_head_cpu, "TINY_MACS", 0)
    monkeypatch.setattr(lm_head_cpu, "VOCAB_TILE", 128)
    monkeypatch.setattr(lm_head_cpu, "CPU_SCRATCH_BYTES", 4 * 128 * 16)
    N, H, V = 70, 72, 300
    hidden = torch.randn(N, H).to(dtype).requires_grad_()
    weight = (torch.randn(V, H) * H**-0.5 * 2).to(dtype).requires_grad_()
    bias = (torch.randn(V) * 0.5).to(dtype)
    ids, g, ge = torch.randint(0, V, (N,)), torch.randn(N), torch.randn(N)
    results = {}
    for amx in ("1", "0"):
        monkeypatch.setenv("R1K_CPU_AMX", amx)
        counting = _CountingExt()
        monkeypatch.setattr(lm_head_cpu, "ext", lambda c=counting: c)
        with r1kernels.use_backend("cpu"):
            logp, _, entropy = token_logprob_stats(hidden, weight, ids, bias=bias, temperature=0.7,
                                                   return_entropy=True)  # fmt: skip
            grads = torch.autograd.grad((logp * g + entropy * ge).sum(), (hidden, weight))
        on_amx = amx == "1" and dtype == torch.bfloat16 and cpu_caps.amx_bf16()
        assert (counting.gemms > 0) == on_amx
        results[amx] = (logp, entropy, *grads)
    for got, want in zip(results["1"][:2], results["0"][:2], strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(results["1"][2:], results["0"][2:], strict=True):
        rel = float((got.double() - want.double()).norm() / want.double().norm())
        assert rel < (1e-2 if dtype == torch.bfloat16 else 1e-5)  # bf16 outputs: one rounding apart
    leaves = [t.detach().double() for t in (hidden, weight, bias)]
    r_logp, r_entropy = ref.token_logprobs(*leaves[:2], ids, leaves[2], 0.7)
    tol = 1e-5 if dtype == torch.float32 else 2e-5  # fp32 logits either way: only the sums' order differs
    assert torch.allclose(results["1"][0].double(), r_logp, rtol=tol, atol=tol)
    assert torch.allclose(results["1"][1].double(), r_entropy, rtol=tol, atol=tol)
