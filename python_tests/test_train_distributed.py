"""Data + expert parallelism for the main job, 2 gloo processes on the CPU: each rank takes half the batch and
holds half of every MoE layer's experts; step 0's loss (summed over ranks) and every gradient (replicated ones
all-reduced, expert shards as they are) equal one process's on the whole batch."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from r1kernels.grpo import grpo_loss
from r1kernels.model import DeepseekV3ForCausalLM, ModelConfig

CONFIG = ModelConfig(vocab_size=19, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)
ROWS, LENGTH, PROMPT = 8, 12, 6


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 19, (ROWS, LENGTH), generator=g)
    mask = (torch.rand(ROWS, LENGTH - PROMPT, generator=g) < 0.9).float()
    return ids, mask, torch.randn(ROWS, generator=g)


def _loss(model, ids, mask, advantages, total_tokens):
    hidden = model.hidden_states(ids[:, :-1])[:, PROMPT - 1 :]
    loss, _ = grpo_loss(hidden, model.lm_head.weight, ids[:, PROMPT:], mask, advantages, loss_type="dapo",
                        num_items_in_batch=total_tokens)  # fmt: skip
    return loss


def _full_model():
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.1)
    return model


def _worker(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    full = _full_model()
    ids, mask, adv = _batch()
    total = float(mask.sum())
    loss = _loss(full, ids, mask, adv, total)
    loss.backward()
    model = DeepseekV3ForCausalLM(CONFIG, ep_group=dist.group.WORLD)
    model.load_state_dict(DeepseekV3ForCausalLM.shard_state_dict(full.state_dict(), rank, world))
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    local = _loss(model, ids[rows], mask[rows], adv[rows], total)
    local.backward()
    summed = local.detach().clone()
    dist.all_reduce(summed)
    for _, p in model.replicated_parameters():
        dist.all_reduce(p.grad)
    full_params = dict(full.named_parameters())
    per_rank = CONFIG.n_routed_experts // world
    errors = {"loss": abs(float(summed) - float(loss))}
    for name, p in model.named_parameters():
        want = full_params[name].grad
        if ".mlp.experts." in name:
            want = want[rank * per_rank : (rank + 1) * per_rank]
        errors[name] = float((p.grad - want).abs().max() / want.abs().max().clamp_min(1e-12))
    torch.save(errors, f"{out}.{rank}")
    dist.destroy_process_group()


def test_step_zero_matches_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "errors")
        mp.spawn(_worker, args=(2, store, out), nprocs=2, join=True)
        for rank in range(2):
            errors = torch.load(f"{out}.{rank}")
            bad = {k: v for k, v in errors.items() if not v < 1e-5}
            assert not bad, f"rank {rank}: {bad}"


def test_main_job_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m r1kernels.train`: data + expert parallel on gloo; rank 0 writes the logs,
    every rank its checkpoint shard."""
    import json
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [torchrun, "--nproc_per_node", "2", "-m", "r1kernels.train", "--steps", "2", "--warmup-steps", "1",
           "--prompts", "2", "--group", "2", "--out", str(tmp_path / "run")]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["processes"] == 2
    assert (tmp_path / "run" / "checkpoint.rank1.pt").exists()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
