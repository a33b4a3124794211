"""MLA training attention against the float64 reference: forward (out, lse) and the gradient of every input,
on the Triton path (interpreter or GPU, 16-bit), the blocked torch path and the small problems' one C++ call
(CPU, fp32 and bf16); causal and not, S not a multiple of the block, packed sequences of lengths 0, 1, 20 and
16, strided inputs, determinism, bad input."""

import pytest
import torch
from conftest import backends_for

import r1kernels
from r1kernels.mla import attention
from r1kernels.mla import reference as ref

DN, DR, DV, H = 32, 16, 32, 3


def _inputs(B, S, device, dtype):
    return [(torch.randn(shape, device=device) * 0.7).to(dtype).requires_grad_()
            for shape in ((B, S, H, DN + DR), (B, S, H, DN), (B, S, DR), (B, S, H, DV))]  # fmt: skip


def _rel(a, b) -> float:
    assert not torch.isnan(a).any()
    return float((a.detach().cpu().double() - b).norm() / b.norm())


def _check(backend, device, dtype, B, S, causal, cu_seqlens=None, max_seqlen=None):
    inputs = _inputs(B, S, device, dtype)
    with r1kernels.use_backend(backend):
        out, lse = r1kernels.mla.mla_attention(*inputs, causal=causal, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        grad = torch.randn_like(out)
        out.backward(grad)
    ins64 = [t.detach().cpu().double().requires_grad_() for t in inputs]
    r_out, r_lse = ref.mla_attention(*ins64, causal=causal, cu_seqlens=None if cu_seqlens is None else cu_seqlens.cpu())
    r_out.backward(grad.cpu().double())
    tol = 1e-5 if dtype == torch.float32 else 2.5e-2
    assert out.shape == (B, S, H, DV) and out.dtype == dtype and lse.shape == (B, H, S)
    assert _rel(out, r_out.detach()) < tol and _rel(lse, r_lse.detach()) < 1e-5
    for name, t, r in zip(("q", "k_nope", "k_pe", "v"), inputs, ins64, strict=True):
        assert _rel(t.grad, r.grad) < tol, name


def _paths():
    """(backend, device, dtype): the Triton kernels on 16-bit inputs; the torch path on fp32 and bf16."""
    out = []
    for p in backends_for():
        backend, device = p.values
        dtypes = (torch.bfloat16, torch.float16) if backend == "triton" else (torch.float32, torch.bfloat16)
        out += [pytest.param(backend, device, dt, id=f"{backend}-{str(dt)[6:]}") for dt in dtypes]
    return out


@pytest.fixture(params=["blocked", "one-call"])
def cpu_form(request, monkeypatch):
    """The CPU forward's two forms: the blocked torch ops, or (every problem counted small) the one C++ call."""
    monkeypatch.setattr(attention, "SMALL_MACS", 0 if request.param == "blocked" else 1 << 40)
    return request.param


def _skip_repeat(backend, cpu_form):
    if backend == "triton" and cpu_form == "one-call":
        pytest.skip("the CPU forms do not apply to the Triton path")


@pytest.mark.parametrize("backend,device,dtype", _paths())
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_matches_reference(backend, device, dtype, causal, cpu_form):
    _skip_repeat(backend, cpu_form)
    _check(backend, device, dtype, 2, 37, causal)


@pytest.mark.parametrize("backend,device,dtype", _paths())
def test_packed_sequences(backend, device, dtype, cpu_form):
    _skip_repeat(backend, cpu_form)
    cu = torch.tensor([0, 0, 1, 21, 37], dtype=torch.int32, device=device)  # lengths 0, 1, 20, 16
    _check(backend, device, dtype, 1, 37, True, cu)


@pytest.mark.parametrize("backend,device,dtype", _paths())
def test_packed_with_max_seqlen_never_reads_offsets_on_the_host_in_triton(backend, device, dtype, monkeypatch):
    """Given max_seqlen (FlashAttention's convention), the Triton path sizes its grid by it and checks cu_seqlens
    on the device: forward and backward run with the host read made to fail. The CPU paths read the offsets (CPU
    memory) and give the same results."""
    if backend == "triton":
        monkeypatch.setattr(attention, "_check_cu_seqlens", lambda *a: pytest.fail("cu_seqlens read on the host"))
    cu = torch.tensor([0, 0, 1, 21, 37], dtype=torch.int32, device=device)
    _check(backend, device, dtype, 1, 37, True, cu, max_seqlen=24)


@pytest.mark.parametrize("backend,device,dtype", _paths())
def test_max_seqlen_below_the_longest_sequence_is_refused(backend, device, dtype):
    """A bound below the longest sequence would leave its last rows unwritten: refused on every path (on the
    device, as a device-side assert, for the Triton path; in the interpreter it raises at once)."""
    if device != "cpu":
        pytest.skip("a failed device-side assert ends the CUDA context for every later test")
    q, kn, kp, v = (t.detach() for t in _inputs(1, 37, device, dtype))
    cu = torch.tensor([0, 0, 1, 21, 37], dtype=torch.int32, device=device)
    with r1kernels.use_backend(backend), pytest.raises((ValueError, RuntimeError), match="max_seqlen"):
        r1kernels.mla.mla_attention(q, kn, kp, v, cu_seqlens=cu, max_seqlen=19)


def test_max_seqlen_needs_cu_seqlens():
    q, kn, kp, v = (t.detach() for t in _inputs(1, 8, "cpu", torch.float32))
    with pytest.raises(ValueError, match="max_seqlen must be a non-negative int given with cu_seqlens"):
        r1kernels.mla.mla_attention(q, kn, kp, v, max_seqlen=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_one_call_strided_inputs_and_nan(dtype):
    """The C++ forward reads each input through its strides (views into wider tensors, heads before
    positions) and lets a NaN reach exactly the outputs that depend on it."""
    B, S = 2, 11
    q = torch.randn(B, H, S, DN + DR + 5).to(dtype).transpose(1, 2)[..., : DN + DR]
    kn = torch.randn(B, S, H, DN + 3).to(dtype)[..., :DN]
    kp = torch.randn(B, S, 2, DR).to(dtype)[:, :, 1]
    v = torch.randn(B, S, H, DV + 7).to(dtype)[..., :DV]
    kn[1, 4, 2, 0] = float("nan")  # batch 1, position 4, head 2: causal queries 4.. of that head
    out, lse = r1kernels.mla.mla_attention(q, kn, kp, v)
    r_out, r_lse = ref.mla_attention(*(t.double() for t in (q, kn, kp, v)), causal=True)
    nan = torch.isnan(r_out)
    assert torch.equal(torch.isnan(out), nan) and nan[1, 4:, 2].all() and nan.sum() == (S - 4) * DV
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.double()[~nan], r_out[~nan], rtol=tol, atol=tol)
    finite = ~torch.isnan(r_lse)
    assert torch.allclose(lse.double()[finite], r_lse[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device,dtype", _paths())
def test_backward_is_deterministic(backend, device, dtype):
    inputs = _inputs(1, 40, device, dtype)
    grads = []
    for _ in range(2):
        with r1kernels.use_backend(backend):
            out, _ = r1kernels.mla.mla_attention(*inputs)
            out.backward(torch.ones_like(out))
        grads.append([t.grad.clone() for t in inputs])
        for t in inputs:
            t.grad = None
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: {**a, "k_pe": torch.randn(1, 8, H, DR)}, "k_pe must be"),
        (lambda a: {**a, "q": torch.randn(1, 8, H, DN + DR + 1)}, "must be k_nope's"),
        (lambda a: {**a, "v": torch.randn(1, 8, H, DV).double()}, "v must have dtype"),
        (lambda a: {**a, "k_nope": torch.randn(1, 8, H + 1, DN)}, "k_nope and v must be"),
        (lambda a: {**a, "v": torch.randn(1, 7, H, DV)}, "k_nope and v must be"),
        (lambda a: {**a, "k_pe": torch.randn(2, 8, DR)}, "k_pe must be"),
        (lambda a: {**a, "q": torch.randn(1, 8, H, 2 * (DN + DR))[..., ::2]}, "q must have unit stride"),
        (lambda a: {**a, "v": torch.randn(1, 8, H, 2 * DV)[..., ::2]}, "v must have unit stride"),
        (lambda a: {**a, "cu_seqlens": torch.tensor([0, 5, 3, 8], dtype=torch.int32)}, "cu_seqlens must rise"),
        (lambda a: {**a, "cu_seqlens": torch.tensor([0, 8])}, "cu_seqlens must have dtype"),
    ],
)
def test_bad_input(change, match):
    q, kn, kp, v = (t.detach() for t in _inputs(1, 8, "cpu", torch.float32))
    args = change({"q": q, "k_nope": kn, "k_pe": kp, "v": v, "cu_seqlens": None})
    with pytest.raises((TypeError, ValueError), match=match):
        r1kernels.mla.mla_attention(args["q"], args["k_nope"], args["k_pe"], args["v"], cu_seqlens=args["cu_seqlens"])
