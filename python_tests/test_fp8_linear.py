"""fp8_linear / FP8Linear: output and both gradients against an fp32 linear by DeepGEMM's metric, every input
dtype and leading shape, the weight-quantization cache (reused, then invalidated by an optimizer step), the
no-weight-grad path, bad input, and a small MLP that must follow the bf16 loss curve."""

import importlib

import pytest
import torch
from conftest import backends_for
from torch import nn

import r1kernels
from r1kernels.fp8 import reference as ref

linear_module = importlib.import_module("r1kernels.fp8.linear")


def _fp32_linear(x, weight, bias, dy):
    x32 = x.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    b32 = bias.detach().float().requires_grad_()
    y = nn.functional.linear(x32, w32, b32)
    y.backward(dy.float())
    return y.detach(), x32.grad, w32.grad, b32.grad


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_output_and_gradients_match_fp32_linear(backend, device, x_dtype, w_dtype):
    layer = r1kernels.fp8.FP8Linear(144, 272, device=device, dtype=w_dtype)
    x = torch.randn(3, 50, 144, device=device).to(x_dtype).requires_grad_()
    with r1kernels.use_backend(backend):
        y = layer(x)
        dy = torch.randn_like(y)
        y.backward(dy)
    assert y.shape == (3, 50, 272) and y.dtype == x_dtype
    assert x.grad.dtype == x_dtype and layer.weight.grad.dtype == w_dtype and layer.bias.grad.dtype == w_dtype
    y32, dx32, dw32, db32 = _fp32_linear(x, layer.weight, layer.bias, dy)
    for got, want in ((y, y32), (x.grad, dx32), (layer.weight.grad, dw32)):
        assert not torch.isnan(got).any()
        assert ref.calc_diff(got.float().cpu(), want.cpu()) < 2e-3
    assert torch.allclose(layer.bias.grad.float(), db32, rtol=1e-2 if w_dtype == torch.bfloat16 else 1e-5, atol=1e-3)


@pytest.mark.parametrize("backend,device", backends_for())
def test_functional_form_2d_and_1d_inputs_without_bias(backend, device):
    weight = torch.randn(48, 32, device=device, requires_grad=True)
    for shape in ((5, 32), (32,)):
        x = torch.randn(shape, device=device, requires_grad=True)
        with r1kernels.use_backend(backend):
            y = r1kernels.fp8.fp8_linear(x, weight)
            y.sum().backward()
        assert y.shape == (*shape[:-1], 48)
        assert ref.calc_diff(y.detach(), x.detach() @ weight.detach().T) < 2e-3
        assert ref.calc_diff(x.grad, weight.detach().sum(0).expand(shape)) < 2e-3
        weight.grad = None


def test_frozen_weight_skips_weight_gradient_work(monkeypatch):
    layer = r1kernels.fp8.FP8Linear(32, 64).requires_grad_(False)
    x = torch.randn(7, 32, requires_grad=True)
    calls = []
    monkeypatch.setattr(linear_module, "wgrad_gemm", lambda *a, **k: calls.append(1))
    layer(x).sum().backward()
    assert not calls and x.grad is not None and layer.weight.grad is None


def test_weight_quantization_is_cached_and_invalidated(monkeypatch):
    layer = r1kernels.fp8.FP8Linear(32, 64)
    made = []
    real = linear_module.QuantizedWeight

    def counting(w):
        made.append(1)
        return real(w)

    monkeypatch.setattr(linear_module, "QuantizedWeight", counting)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(4, 32)
    y0 = layer(x)
    y0.sum().backward()
    layer(x)
    assert len(made) == 1  # forward, backward and a second forward share one quantization
    opt.step()
    y1 = layer(x)
    assert len(made) == 2 and not torch.equal(y0, y1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(64, 32))
    assert ref.calc_diff(layer(x).detach(), x @ layer.weight.detach().T + layer.bias.detach()) < 2e-3
    assert len(made) == 3


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: r1kernels.fp8.FP8Linear(30, 64), "multiples of 16"),
        (lambda: r1kernels.fp8.fp8_linear(torch.randn(4, 32), torch.randn(40, 32)), "multiples of 16"),
        (lambda: r1kernels.fp8.fp8_linear(torch.randn(4, 48), torch.randn(64, 32)), "in_features = weight"),
        (lambda: r1kernels.fp8.fp8_linear(torch.randn(4, 32), torch.randn(64, 32), torch.randn(3)), "bias must be"),
        (lambda: r1kernels.fp8.fp8_linear(torch.ones(4, 32, dtype=torch.int64), torch.randn(64, 32)), "x must have"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


class _BF16Linear(nn.Linear):
    """The baseline: fp32 master weights, bf16 GEMMs (what mixed-precision training does)."""

    def forward(self, x):
        return nn.functional.linear(x.bfloat16(), self.weight.bfloat16(), self.bias.bfloat16())


def _train(linear_cls, steps=300):
    """A 3-layer MLP regressing a fixed teacher plus noise (an irreducible loss floor, as in language modelling);
    SGD with momentum, so any error in a gradient's scale shows in the curve (Adam would hide it)."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64))
    torch.manual_seed(1)
    model = nn.Sequential(linear_cls(64, 256), nn.GELU(), linear_cls(256, 256), nn.GELU(), linear_cls(256, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        x = torch.randn(256, 64, generator=g)
        with torch.no_grad():
            target = teacher(x) + 0.3 * torch.randn(x.shape, generator=g)
        loss = ((model(x.bfloat16()).float() - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses).view(-1, 20).mean(1)  # 20-step windows: the curve without batch noise


def test_mlp_follows_bf16_loss_curve():
    """Measured on the CPU path: the gap stays under 0.25% over 300 steps; a weight gradient off by 30% opens
    an 11% gap."""
    bf16, fp8 = _train(_BF16Linear), _train(r1kernels.fp8.FP8Linear)
    assert bf16[-1] < 0.75 * bf16[0], "the baseline must learn, or the comparison means nothing"
    gap = ((fp8 - bf16) / bf16).abs()
    assert float(gap.max()) < 0.01, f"FP8 loss curve off the bf16 one by up to {float(gap.max()):.4f}"


def _rel(got, want) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_aware_reference_matches_the_kernels_to_accumulation_order(backend, device, dtype):
    """``reference.fp8_linear`` (float64 from the same e4m3 tiles: x 1 x 128 and W 128 x 128 forward, dy 1 x 128
    dgrad, dy.T and x.T 128 x 1 wgrad) against the kernels, on 200 tokens (one partial 128-token tile) and 144
    in-features (a partial 128-wide group): output and all three gradients agree to accumulation order (5e-7
    measured in fp32; in bf16 the outputs' own rounding, 6e-5), while the unquantized float64 linear is 3.6e-2
    away. So the whole-model check can hold FP8 kernels to a bar that a 1% error crosses (checked below)."""
    w = torch.randn(272, 144, device=device).to(dtype).requires_grad_()
    b = torch.randn(272, device=device).to(dtype).requires_grad_()
    x = torch.randn(2, 100, 144, device=device).to(dtype).requires_grad_()
    dy = torch.randn(2, 100, 272, device=device).to(dtype)
    with r1kernels.use_backend(backend):
        y = r1kernels.fp8.fp8_linear(x, w, b)
        y.backward(dy)
    got = [t.detach().cpu() for t in (y, x.grad, w.grad, b.grad)]
    xr, wr, br = (t.detach().cpu().requires_grad_() for t in (x, w, b))
    yr = ref.fp8_linear(xr, wr, br)
    yr.backward(dy.cpu().double())
    want = [yr.detach().to(dtype), xr.grad, wr.grad, br.grad]
    assert all(g.dtype == dtype for g in want[1:]) and yr.dtype == torch.float64
    bar = 1e-5 if dtype == torch.float32 else 5e-4
    for name, g, r in zip(("output", "dx", "dw", "db"), got, want, strict=True):
        assert _rel(g, r) < bar, name
    plain = nn.functional.linear(xr.detach().double(), wr.detach().double(), br.detach().double())
    assert _rel(got[0], plain) > 20 * bar  # the e4m3 rounding itself is what the reference reproduces
    assert _rel(got[2] * 0.99, want[2]) > 10 * bar  # a 1% weight-gradient error stands well clear of the bar


def test_fp8_linear_under_reference_ops_is_the_float64_recipe():
    """Inside ``reference_ops()`` an FP8Linear computes through ``reference.fp8_linear`` (for whole-model
    validation), in x's dtype; ``to_fp8_linear`` converts an nn.Linear in place, names and parameters kept, and
    leaves one whose features are not multiples of 16."""
    from r1kernels.fp8.linear import to_fp8_linear
    from r1kernels.reference_mode import reference_ops

    plain = nn.Linear(48, 32)
    weight = plain.weight
    assert to_fp8_linear(plain) and isinstance(plain, r1kernels.fp8.FP8Linear) and plain.weight is weight
    assert list(dict(plain.named_parameters())) == ["weight", "bias"]
    x = torch.randn(5, 48)
    with reference_ops():
        y = plain(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, ref.fp8_linear(x, plain.weight, plain.bias).float())
    odd = nn.Linear(48, 40)
    assert not to_fp8_linear(odd) and type(odd) is nn.Linear
