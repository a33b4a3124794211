"""DeepSeek-V3 routing against the float64 reference (selection exactly, weights and logit gradients to fp32
rounding), HF transformers' DeepseekV3TopkRouter when installed, ties and NaN, the torch fallback, the
balancing step and loss, bad input."""

import importlib

import pytest
import torch
from conftest import HAS_GPU

import r1kernels
from r1kernels.moe import reference as ref

route_module = importlib.import_module("r1kernels.moe.route")
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])

CASES = [  # (T, E, top_k, n_group, topk_group, score_func, norm, scaling)
    (257, 64, 6, 8, 4, "sigmoid", True, 2.5),  # the MoE benchmark's routing
    (100, 256, 8, 8, 4, "sigmoid", True, 2.5),  # DeepSeek-V3's
    (33, 72, 5, 6, 2, "sigmoid", True, 1.0),  # E not a power of two, groups of 12
    (40, 20, 1, 1, 1, "softmax", False, 1.0),  # V2-style softmax, k = 1, one group
    (1, 512, 16, 16, 3, "sigmoid", False, 1.5),  # the largest E, one token
]


def _logits_and_bias(T, E, device, dtype=torch.float32):
    return torch.randn(T, E, device=device).to(dtype), (torch.randn(E, device=device) * 0.05)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference_forward_and_backward(device, case, dtype):
    T, E, k, n_group, topk_group, score_func, norm, scaling = case
    logits, bias = _logits_and_bias(T, E, device, dtype)
    kw = dict(top_k=k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=scaling, norm_topk_prob=norm,
              score_func=score_func)  # fmt: skip
    lg = logits.clone().requires_grad_()
    weights, ids = r1kernels.moe.route(lg, bias, **kw)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (T, k)
    l64 = logits.cpu().double().requires_grad_()
    r_weights, r_ids = ref.route(l64, bias.cpu(), **kw)
    assert torch.equal(ids.cpu().long(), r_ids)
    assert torch.allclose(weights.cpu().double(), r_weights, rtol=2e-6, atol=1e-7)
    grad = torch.randn(T, k, device=device)
    weights.backward(grad)
    r_weights.backward(grad.cpu().double())
    # fp32: the gradient is formed in fp32 (a few ulp each way); bf16: the logits' gradient is rounded to bf16
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(lg.grad.cpu().double(), l64.grad, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_lower_index(device):
    """Integer logits: many exact ties among experts and among groups; the lower index wins every one."""
    logits = torch.randint(-2, 3, (64, 32), device=device).float()
    for n_group, topk_group in ((1, 1), (4, 2)):
        kw = dict(top_k=5, n_group=n_group, topk_group=topk_group)
        _, ids = r1kernels.moe.route(logits, **kw)
        assert torch.equal(ids.cpu().long(), ref.route(logits.cpu(), **kw)[1])


@pytest.mark.parametrize("device", DEVICES)
def test_nan_logit_is_never_chosen_over_a_number(device):
    logits, _ = _logits_and_bias(8, 16, device)
    logits[:, 3] = float("nan")
    weights, ids = r1kernels.moe.route(logits, top_k=15)
    assert not (ids == 3).any() and torch.isfinite(weights).all()
    weights, ids = r1kernels.moe.route(logits, top_k=16)  # the NaN expert must be taken: NaN weights
    assert (ids[:, -1] == 3).all() and torch.isnan(weights).all()


def test_torch_fallback_selects_the_same():
    logits, bias = _logits_and_bias(300, 64, "cpu")
    w, ids = route_module._route_torch(logits, bias, 6, 8, 4, 2.5, True, False)
    w_cpp, ids_cpp = r1kernels.moe.route(logits, bias, top_k=6, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    assert torch.equal(ids, ids_cpp) and torch.allclose(w, w_cpp, rtol=1e-6)


def test_empty_input():
    w, ids = r1kernels.moe.route(torch.randn(0, 16), top_k=2)
    assert w.shape == (0, 2) and ids.shape == (0, 2)


def test_matches_hf_deepseek_v3_router():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = transformers.DeepseekV3Config(hidden_size=96, n_routed_experts=64, num_experts_per_tok=6, n_group=8,
                                           topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True)  # fmt: skip
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(std=0.05)
    hidden = torch.randn(200, 96)
    _, hf_weights, hf_ids = router(hidden)
    logits = hidden @ router.weight.T
    weights, ids = r1kernels.moe.route(logits, router.e_score_correction_bias, top_k=6, n_group=8, topk_group=4,
                                       routed_scaling_factor=2.5)  # fmt: skip
    order, hf_order = ids.long().argsort(-1), hf_ids.argsort(-1)  # HF's topk(sorted=False): compare as sets
    assert torch.equal(ids.long().gather(1, order), hf_ids.gather(1, hf_order))
    assert torch.allclose(weights.gather(1, order), hf_weights.gather(1, hf_order), rtol=1e-5, atol=1e-6)


def test_update_correction_bias_moves_toward_balance():
    bias = torch.randn(6)
    before = bias.clone()
    counts = torch.tensor([10, 2, 6, 6, 0, 12])  # mean 6
    out = r1kernels.moe.update_correction_bias(bias, counts, 0.001)
    assert out is bias
    assert torch.allclose(bias - before, torch.tensor([-1.0, 1, 0, 0, 1, -1]) * 0.001, rtol=0, atol=1e-6)
    ids = torch.tensor([[0, 1], [0, 5], [5, 5]])
    assert torch.equal(r1kernels.moe.tokens_per_expert(ids, 6), torch.tensor([2, 1, 0, 0, 0, 3]))


def test_sequence_balance_loss_matches_formula_and_differentiates():
    B, T, E, k = 3, 20, 16, 4
    logits = torch.randn(B, T, E, requires_grad=True)
    _, ids = r1kernels.moe.route(logits.detach().view(-1, E), top_k=k)
    ids = ids.view(B, T, k)
    loss = r1kernels.moe.sequence_balance_loss(logits, ids, top_k=k, alpha=1e-4)
    want = 0.0
    for b in range(B):
        s = torch.sigmoid(logits[b].double())
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        f = torch.stack([(ids[b] == i).sum() for i in range(E)]).double() * E / (k * T)
        want = want + (f * p).sum()
    assert torch.allclose(loss.double(), 1e-4 * want / B, rtol=1e-5)
    loss.backward()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(top_k=0), "top_k must be a positive int"),
        (dict(top_k=17), r"top_k \(17\) must be <="),
        (dict(top_k=2, n_group=3), "divisible by n_group"),
        (dict(top_k=2, n_group=4, topk_group=5), "topk_group"),
        (dict(top_k=2, n_group=16), "each group needs >= 2 experts"),
        (dict(top_k=2, score_func="relu"), "score_func"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        r1kernels.moe.route(torch.randn(4, 16), **kw)


def test_bad_tensors():
    with pytest.raises(TypeError, match="logits must have dtype"):
        r1kernels.moe.route(torch.randn(4, 16).half(), top_k=2)
    with pytest.raises(ValueError, match="correction_bias must be"):
        r1kernels.moe.route(torch.randn(4, 16), torch.zeros(8), top_k=2)
    with pytest.raises(ValueError, match="between 1 and 512"):
        r1kernels.moe.route(torch.randn(4, 513), top_k=2)
