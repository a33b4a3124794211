"""Grouped expert linear layers against float64: forward, input and weight gradients, every backend, 128-aligned
segments with padding rows holding NaN (never read by the weight gradient), an expert with no rows, and the
persistent grid with one program."""

import importlib

import pytest
import torch
from conftest import HAS_GPU, backends_for

import r1kernels
from r1kernels.moe import reference as ref


def _case(T, k, E, N, K, device, dtype, align=128):
    ids = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)]).to(torch.int32)  # expert E-1: no rows
    index = r1kernels.moe.permutation_index(ids.to(device), E, align=align)
    x = torch.randn(index.source.shape[0], K, device=device).to(dtype)
    x[index.row_expert < 0] = float("nan")  # padding rows: whatever the permutation left there
    weight = (torch.randn(E, N, K, device=device) * K**-0.5).to(dtype)
    return index, x, weight


def _run(backend, device, dtype, T=70, k=2, E=5, N=96, K=80, align=128):
    index, x, weight = _case(T, k, E, N, K, device, dtype, align)
    x.requires_grad_()
    weight.requires_grad_()
    with r1kernels.use_backend(backend):
        out = r1kernels.moe.grouped_linear(x, weight, index)
        grad = torch.randn_like(out)
        grad[index.row_expert < 0] = 0.0  # what unpermute's backward hands back on padding rows
        out.backward(grad)
    valid = (index.row_expert >= 0).cpu()
    x64 = torch.where(valid[:, None], x.detach().cpu().double(), 0.0).requires_grad_()
    w64 = weight.detach().cpu().double().requires_grad_()
    r = ref.grouped_linear(x64, w64, index.row_expert.cpu())
    r.backward(grad.cpu().double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2 if dtype == torch.bfloat16 else 4e-3
    o = out.detach().cpu().double()
    assert torch.equal(o[~valid], torch.zeros_like(o[~valid]))
    assert torch.allclose(o[valid], r[valid].detach(), rtol=tol, atol=tol)
    assert torch.allclose(x.grad.cpu().double()[valid], x64.grad[valid], rtol=tol, atol=tol)
    assert torch.allclose(weight.grad.cpu().double(), w64.grad, rtol=tol, atol=tol)
    assert torch.equal(weight.grad[-1].cpu(), torch.zeros_like(weight.grad[-1].cpu()))


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_and_gradients(backend, device, dtype):
    _run(backend, device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("align", [1, 4], ids=["packed", "padded"])
def test_decode_sized_rows_on_the_cpu(dtype, align):
    """At most 16 rows (a decode step): the CPU's few-row path, padding rows included (align 4; the GPU kernel
    needs 128-row segments)."""
    _run("cpu", "cpu", dtype, T=3, k=2, E=5, N=40, K=72, align=align)


def test_persistent_grid_with_one_program(kernel_device, monkeypatch):
    monkeypatch.setattr(r1kernels.backend, "sm_count", lambda device: 1)
    _run("triton", kernel_device, torch.float32, T=150, k=2, E=4, N=200, K=48)


@pytest.mark.skipif(not HAS_GPU, reason="the alignment check runs on the device")
def test_gpu_needs_128_aligned_segments():
    bad = r1kernels.moe.permutation_index(torch.randint(0, 4, (20, 2), dtype=torch.int32, device="cuda"), 4)
    x = torch.randn(bad.source.shape[0], 32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        r1kernels.moe.grouped_linear(x, torch.randn(4, 32, 32, device="cuda", dtype=torch.bfloat16), bad)
        torch.cuda.synchronize()


def test_bad_input():
    index, x, weight = _case(20, 2, 4, 32, 32, "cpu", torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        r1kernels.moe.grouped_linear(x, weight[:, :, :16].contiguous(), index)
    with pytest.raises(TypeError, match="weight must have dtype"):
        r1kernels.moe.grouped_linear(x, weight.bfloat16(), index)
    with pytest.raises(ValueError, match="index must describe"):
        r1kernels.moe.grouped_linear(x[:-1].contiguous(), weight, index)


_RULE_BREAKS = [  # each rule broken once on otherwise valid operands: the one-pass check says no, the op names it
    ("x", lambda t: t[:, ::2], "x must be contiguous"),
    ("x", lambda t: t[None], "x must be 2-D"),
    ("weight", lambda t: t.transpose(1, 2), "weight must be contiguous"),
    ("weight", lambda t: t.double(), "weight must have dtype"),
    ("row_expert", lambda t: t.long(), "row_expert must have dtype"),
    ("row_expert", lambda t: t[:-1], "index must describe"),
    ("offsets", lambda t: t.int(), "offsets must have dtype"),
    ("offsets", lambda t: t[:-1], "index must describe"),
    ("counts", lambda t: t[:-1], "index must describe"),
    ("counts", lambda t: t.long(), "counts must have dtype"),
    ("counts", lambda t: torch.stack([t, t], 1)[:, 0], "counts must be contiguous"),
]


@pytest.mark.parametrize("operand,change,match", _RULE_BREAKS, ids=[f"{o}-{m}" for o, _, m in _RULE_BREAKS])
def test_every_rule_is_checked_on_the_fast_path(operand, change, match):
    grouped_linear_module = importlib.import_module("r1kernels.moe.grouped_linear")
    index, x, weight = _case(20, 2, 4, 32, 32, "cpu", torch.float32)
    args = {"x": x, "weight": weight, "row_expert": index.row_expert, "offsets": index.offsets, "counts": index.counts}
    assert grouped_linear_module._valid(*args.values())
    args[operand] = change(args[operand])
    assert not grouped_linear_module._valid(*args.values())
    with pytest.raises((TypeError, ValueError), match=match):
        r1kernels.moe.grouped_linear(args["x"], args["weight"], index._replace(
            row_expert=args["row_expert"], offsets=args["offsets"], counts=args["counts"]))  # fmt: skip


@pytest.mark.parametrize("backend,device", backends_for())
def test_fp8_grouped_linear_forward_and_gradients(backend, device):
    """FP8 experts (forward, dgrad, wgrad all FP8) within DeepGEMM's metric of the fp32 grouped linear."""
    from r1kernels.fp8.reference import calc_diff

    E, N, K = 4, 256, 192
    ids = torch.stack([torch.randperm(E)[:2] for _ in range(300)]).to(torch.int32)
    index = r1kernels.moe.permutation_index(ids.to(device), E, align=128)
    valid = index.row_expert >= 0
    x = torch.randn(index.source.shape[0], K, device=device)
    x[~valid] = float("nan")  # padding rows: never read into a sum
    w = torch.randn(E, N, K, device=device) * K**-0.5
    x8, w8 = x.clone().requires_grad_(), w.clone().requires_grad_()
    with r1kernels.use_backend(backend):
        y = r1kernels.moe.fp8_grouped_linear(x8, w8, index)
        grad = torch.randn_like(y)
        grad[~valid] = 0.0
        y.backward(grad)
    x32, w32 = torch.where(valid[:, None], x, 0.0).requires_grad_(), w.clone().requires_grad_()
    with r1kernels.use_backend("cpu"):
        y32 = r1kernels.moe.grouped_linear(x32.cpu(), w32.cpu(), r1kernels.moe.permutation_index(ids, E, align=128))
        y32.backward(grad.cpu())
    v = valid.cpu()
    assert not torch.isnan(w8.grad).any()
    assert calc_diff(y.detach().cpu()[v], y32.detach()[v]) < 2e-3
    assert calc_diff(x8.grad.cpu()[v], x32.grad.cpu()[v]) < 2e-3
    assert calc_diff(w8.grad.cpu(), w32.grad.cpu()) < 2e-3
