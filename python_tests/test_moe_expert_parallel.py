"""Expert parallelism on gloo with 2 and 4 CPU processes: every rank's outputs and every gradient (hidden
states, its own experts, and the all-reduced router and shared expert) equal one process's; experts that do
not split evenly over the ranks are rejected."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import r1kernels

KW = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
          n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True)  # fmt: skip
TOKENS_PER_RANK = 11


def _reference(world):
    torch.manual_seed(0)
    full = r1kernels.moe.MoE(**KW)
    with torch.no_grad():
        full.gate.e_score_correction_bias.normal_(std=0.05)
    x = torch.randn(world * TOKENS_PER_RANK, KW["hidden_size"], requires_grad=True)
    y = full(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    return full, x, y.detach(), grad


def _worker(rank, world, path, out_path):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    full, x, y_ref, grad = _reference(world)
    layer = r1kernels.moe.MoE(**KW, ep_group=dist.group.WORLD)
    layer.load_state_dict(r1kernels.moe.MoE.shard_state_dict(full.state_dict(), rank, world))
    rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    x_local = x.detach()[rows].clone().requires_grad_()
    y = layer(x_local)
    y.backward(grad[rows])
    for p in (*layer.gate.parameters(), *layer.shared_experts.parameters()):  # replicated: all-reduce
        dist.all_reduce(p.grad)
    per_rank = KW["n_routed_experts"] // world
    experts = slice(rank * per_rank, (rank + 1) * per_rank)
    checks = {
        "output": torch.allclose(y.detach(), y_ref[rows], rtol=1e-5, atol=1e-6),
        "x.grad": torch.allclose(x_local.grad, x.grad[rows], rtol=1e-5, atol=1e-6),
        "gate_up": torch.allclose(
            layer.experts.gate_up_proj.grad, full.experts.gate_up_proj.grad[experts], rtol=1e-5, atol=1e-6
        ),
        "down": torch.allclose(
            layer.experts.down_proj.grad, full.experts.down_proj.grad[experts], rtol=1e-5, atol=1e-6
        ),
        "gate": torch.allclose(layer.gate.weight.grad, full.gate.weight.grad, rtol=1e-5, atol=1e-6),
        "shared": all(
            torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)
            for a, b in zip(layer.shared_experts.parameters(), full.shared_experts.parameters(), strict=True)
        ),
    }
    try:
        r1kernels.moe.MoE(**{**KW, "n_routed_experts": 2 * world + 1, "n_group": 1}, ep_group=dist.group.WORLD)
        checks["uneven experts rejected"] = False
    except ValueError as err:
        checks["uneven experts rejected"] = "split evenly" in str(err)
    torch.save(checks, f"{out_path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_matches_one_process(world):
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "checks")
        mp.spawn(_worker, args=(world, store, out), nprocs=world, join=True)
        for rank in range(world):
            checks = torch.load(f"{out}.{rank}")
            assert all(checks.values()), f"rank {rank}: {checks}"
