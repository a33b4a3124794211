"""MoE permute / unpermute against float64 loops, forward and backward (rows and routing weights), every
backend, with padding rows holding NaN, unrouted slots, FP8 rows with their scales, determinism, bad input."""

import pytest
import torch
from conftest import backends_for

import r1kernels
from r1kernels.moe import reference as ref


def _index(T, k, E, device, align=16, drop=0.1):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
    ids[torch.rand(ids.shape) < drop] = -1
    return ids, r1kernels.moe.permutation_index(ids.to(device), E, align=align)


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T,k,E,H", [(37, 3, 8, 300), (5, 6, 64, 1100), (1, 1, 4, 64)], ids=str)
def test_permute_unpermute_forward_backward(backend, device, dtype, T, k, E, H):
    _, index = _index(T, k, E, device)
    # x strided: its rows are H elements of wider rows, so a kernel that assumes a row stride of H fails
    x = torch.randn(T, H + 5, device=device).to(dtype)[:, :H].detach().requires_grad_()
    weights = torch.rand(T, k, device=device).requires_grad_()
    with r1kernels.use_backend(backend):
        rows = r1kernels.moe.moe_permute(x, index)
        expert_out = rows * 2 + 1  # stands in for the experts; padding rows become 1, not 0
        expert_out = torch.where((index.source >= 0)[:, None], expert_out, float("nan"))  # never read
        out = r1kernels.moe.moe_unpermute(expert_out, index, weights)
        grad = torch.randn_like(out)
        out.backward(grad)
    src, row_of = index.source.cpu(), index.row_of.cpu()
    x64 = x.detach().cpu().double().requires_grad_()
    w64 = weights.detach().cpu().double().requires_grad_()
    r_rows = ref.permute(x64.detach(), src, k)
    assert torch.equal(rows.detach().cpu().double(), r_rows.to(dtype).double())  # a copy: exact
    r_out = ref.unpermute(torch.where((src >= 0)[:, None], ref.permute(x64, src, k) * 2 + 1, 0.0), row_of, w64)
    if r_out.requires_grad:  # False when every slot was dropped: then every gradient below must be 0
        r_out.backward(grad.cpu().double())
    else:
        x64.grad, w64.grad = torch.zeros_like(x64), torch.zeros_like(w64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert not torch.isnan(out).any() and torch.allclose(out.detach().cpu().double(), r_out.detach(), rtol=tol,
                                                         atol=tol)  # fmt: skip
    assert torch.allclose(x.grad.cpu().double(), x64.grad, rtol=tol, atol=tol)
    assert torch.allclose(weights.grad.cpu().double(), w64.grad, rtol=tol, atol=tol * H**0.5)


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weighted_rows_round_like_torch(backend, device, dtype):
    """unpermute's row gradient is out-gradient x weight rounded once to the rows' dtype: bit-equal to torch's
    rounding over magnitudes from subnormal to overflow (fp16 saturates to inf past 65504)."""
    _, index = _index(16, 3, 8, device, align=1, drop=0.2)
    magnitude = 10.0 ** torch.empty(16, 256).uniform_(-9, 5.5)
    grad = (torch.randn(16, 256) * magnitude).to(dtype).to(device)
    weights = torch.rand(16, 3, device=device) * 4
    rows = torch.randn(index.source.shape[0], 256, device=device).to(dtype).requires_grad_()
    with r1kernels.use_backend(backend):
        r1kernels.moe.moe_unpermute(rows, index, weights).backward(grad)
    src = index.source.cpu().long()
    want = (grad.cpu().float()[src // 3] * weights.cpu().view(-1)[src][:, None]).to(dtype)
    assert torch.equal(rows.grad.cpu().view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("backend,device", backends_for())
def test_backward_is_deterministic(backend, device):
    _, index = _index(64, 4, 8, device, align=1, drop=0.0)
    x = torch.randn(64, 512, device=device, requires_grad=True)
    grads = []
    for _ in range(2):
        with r1kernels.use_backend(backend):
            rows = r1kernels.moe.moe_permute(x, index)
            rows.backward(torch.ones_like(rows) * torch.arange(rows.shape[0], device=device)[:, None] * 0.37)
        grads.append(x.grad.clone())
        x.grad = None
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend,device", backends_for())
def test_fp8_rows_move_with_their_scales(backend, device):
    _, index = _index(40, 2, 8, device, align=128)
    x = torch.randn(40, 384, device=device)
    q, s = r1kernels.fp8.quantize_per_token_group(x)
    with r1kernels.use_backend(backend):
        rq, rs = r1kernels.moe.moe_permute_fp8(q, s, index)
    src = index.source.cpu()
    valid = src >= 0
    want_q = q.cpu().view(torch.uint8)[(src.clamp_min(0) // 2).long()]
    want_s = s.cpu()[(src.clamp_min(0) // 2).long()]
    assert torch.equal(rq.cpu().view(torch.uint8)[valid], want_q[valid]) and torch.equal(rs.cpu()[valid], want_s[valid])
    assert (rq.cpu().view(torch.uint8)[~valid] == 0).all() and (rs.cpu()[~valid] == 0).all()
    assert rq.shape[0] % 128 == 0  # ready for grouped_gemm_nt_contiguous with index.row_expert


def test_bad_input():
    _, index = _index(10, 2, 4, "cpu")
    with pytest.raises(ValueError, match=r"index\.row_of must have one row per token"):
        r1kernels.moe.moe_permute(torch.randn(11, 32), index)
    with pytest.raises(TypeError, match="x must have dtype"):
        r1kernels.moe.moe_permute(torch.randn(10, 32).double(), index)
    rows = torch.randn(index.source.shape[0], 32)
    with pytest.raises(ValueError, match="weights must be"):
        r1kernels.moe.moe_unpermute(rows, index, torch.rand(10, 3))
    with pytest.raises(ValueError, match=r"rows must have index\.source's"):
        r1kernels.moe.moe_unpermute(rows[:-1], index, torch.rand(10, 2))
