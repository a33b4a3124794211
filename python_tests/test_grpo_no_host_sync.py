"""The GRPO hot path makes no host synchronisation: packed input (cu_seqlens) traces whole under
torch.compile(fullgraph=True), where a data-dependent check would fail to trace, and bad offsets are still
caught (on the device / at run time) instead of silently mixing sequences."""

import pytest
import torch

from r1kernels.grpo import grpo_loss

H, V = 16, 40


def _packed(lengths):
    N = sum(lengths)
    hidden = torch.randn(N, H)
    weight = torch.randn(V, H) * H**-0.5
    ids = torch.randint(0, V, (N,))
    mask = (torch.rand(N) > 0.2).float()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    adv = torch.randn(len(lengths))
    old = -torch.rand(N) * 3
    return hidden, weight, ids, mask, adv, cu, old


def _step(hidden, weight, ids, mask, adv, cu, old):
    loss, metrics = grpo_loss(hidden, weight, ids, mask, adv, cu_seqlens=cu, old_logps=old, loss_type="grpo",
                              importance_sampling_level="sequence")  # fmt: skip
    return loss, metrics["clip_ratio"]


def test_packed_input_compiles_fullgraph_and_matches_eager():
    args = _packed([5, 1, 7, 3])
    compiled = torch.compile(_step, fullgraph=True)
    w1, w2 = args[1].clone().requires_grad_(), args[1].clone().requires_grad_()
    out_c = compiled(args[0], w1, *args[2:])
    out_e = _step(args[0], w2, *args[2:])
    out_c[0].backward()
    out_e[0].backward()
    for a, b in zip(out_c, out_e, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-5, atol=1e-7)


def test_bad_offsets_are_caught_inside_a_compiled_graph():
    hidden, weight, ids, mask, adv, cu, old = _packed([5, 1, 7, 3])
    bad = cu.clone()
    bad[2] = bad[3] + 1  # decreasing
    compiled = torch.compile(_step, fullgraph=True)
    with pytest.raises(RuntimeError, match="cu_seqlens must be non-decreasing"):
        compiled(hidden, weight, ids, mask, adv, bad, old)
