"""The GRPO loop on the tiny DeepSeek-V3: a micro run (warm-up, sampling through the paged-cache decode path,
rewards, the fused loss with its float64 check on every step, the routing-bias update) runs end to end."""

import torch

from r1kernels.model import ModelConfig
from r1kernels.train.deepseek_grpo import Config, _completion_mask, train


def test_completion_mask_stops_after_the_first_eos():
    c = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8]])
    assert _completion_mask(c, eos=1).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_micro_run_checks_every_step():
    cfg = Config(model=ModelConfig(vocab_size=19, num_hidden_layers=2), warmup_steps=2, steps=3, prompts=2, group=4,
                 max_new_tokens=6, check_every=1)  # fmt: skip
    out = train(cfg, log=lambda *_: None)
    assert len(out["history"]) == 3 and out["worst_reference_error"] < 1e-3
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in out["history"])
