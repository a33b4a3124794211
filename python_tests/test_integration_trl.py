"""``R1GRPOTrainer``: on the same generated batch, r1kernels' fused loss gives TRL's loss and every parameter's
gradient for each loss type, importance-sampling level, KL setting and correction TRL offers and the fused loss
expresses; one real ``train()`` step runs end to end. A tiny DeepSeek-V3 and a word-level tokenizer are built
here (no downloads)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from r1kernels.integrations.trl import R1GRPOTrainer, unsupported_options

WORDS = ["<pad>", "<eos>"] + [f"w{i}" for i in range(30)]


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _saved_model(path) -> str:
    torch.manual_seed(0)
    config = DeepseekV3Config(vocab_size=len(WORDS), hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                              kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, v_head_dim=32,
                              qk_nope_head_dim=32, n_group=2, topk_group=1, num_experts_per_tok=2,
                              first_k_dense_replace=1, pad_token_id=0, eos_token_id=1, bos_token_id=None)  # fmt: skip
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(path)
    return str(path)


def _dataset() -> Dataset:
    return Dataset.from_dict({"prompt": [" ".join(f"w{(7 * i + j) % 30}" for j in range(3 + i % 3)) for i in range(8)]})


def _reward(completions, **_):
    return [float(len(c.split())) + 0.1 * (hash(c) % 7) for c in completions]


def _trainer(path, tmp_path, **config) -> R1GRPOTrainer:
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, report_to="none", use_cpu=True, bf16=False, max_steps=1,
                      logging_steps=1, seed=0, **config)  # fmt: skip
    return R1GRPOTrainer(model=path, reward_funcs=_reward, args=args, train_dataset=_dataset(),
                         processing_class=_tokenizer())  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One trainer (beta > 0 so it holds a reference model; two iterations so TRL computes old log-probs) and
    one generated, scored batch that both losses see."""
    tmp = tmp_path_factory.mktemp("trl")
    trainer = _trainer(_saved_model(tmp / "model"), tmp, beta=0.05, num_iterations=2)
    torch.manual_seed(1)
    inputs = trainer._generate_and_score_completions([_dataset()[i] for i in range(4)])
    # the policy has not moved since sampling, nor from the reference: shift the old and reference log-probs so
    # the ratios leave 1 (the clips act) and the KL term and its gradient are not zero
    g = torch.Generator().manual_seed(2)
    for key in ("old_per_token_logps", "ref_per_token_logps"):
        inputs[key] = inputs[key] + 0.25 * torch.randn(inputs[key].shape, generator=g)
    trainer.model.train()
    return trainer, inputs


def _loss_and_grads(trainer, inputs, loss_fn):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = loss_fn(trainer, model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(trainer, inputs, tol=2e-5):
    want, want_grads = _loss_and_grads(trainer, inputs, GRPOTrainer._compute_loss)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    got, grads = _loss_and_grads(trainer, inputs, R1GRPOTrainer._compute_loss)
    ours = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    assert float(got) == pytest.approx(float(want), rel=tol, abs=1e-7)
    assert grads.keys() == want_grads.keys() and len(grads) > 10
    for name, g in want_grads.items():
        err = float((grads[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert err < tol, f"{name}: {err:.2e}"
    for key in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl"):
        if key in trl_metrics:
            assert ours[key] == pytest.approx(trl_metrics[key], rel=1e-4, abs=1e-6), key
    return float(want)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_and_gradients_match_trl(setup, loss_type, level):
    trainer, inputs = setup
    trainer.loss_type, trainer.importance_sampling_level, trainer.beta = loss_type, level, 0.05
    trainer.current_gradient_accumulation_steps = 1
    _compare(trainer, inputs)


@pytest.mark.parametrize("case", ["on-policy", "beta 0", "k3 without ratio", "delta", "accumulation"])
def test_options_map_one_to_one(setup, case, monkeypatch):
    trainer, inputs = setup
    inputs = dict(inputs)
    trainer.loss_type, trainer.importance_sampling_level, trainer.beta = "dapo", "token", 0.05
    trainer.current_gradient_accumulation_steps = 1
    if case == "on-policy":
        del inputs["old_per_token_logps"]
    elif case == "beta 0":
        trainer.beta = 0.0
    elif case == "k3 without ratio":
        monkeypatch.setattr(trainer.args, "use_bias_correction_kl", False)
    elif case == "delta":
        monkeypatch.setattr(trainer.args, "delta", 1.1)
        monkeypatch.setattr(trainer, "epsilon_high", 0.05)
    elif case == "accumulation":  # dapo's normaliser and the others' division by the accumulation steps
        trainer.current_gradient_accumulation_steps = 2
        monkeypatch.setattr(trainer.args, "steps_per_generation", 4)
        _compare(trainer, inputs)
        trainer.loss_type = "grpo"
    _compare(trainer, inputs)


def test_vllm_importance_sampling_and_off_policy_mask(setup, monkeypatch):
    trainer, inputs = setup
    inputs = dict(inputs)
    trainer.loss_type, trainer.importance_sampling_level, trainer.beta = "bnpo", "token", 0.05
    trainer.current_gradient_accumulation_steps = 1
    g = torch.Generator().manual_seed(3)
    shape = inputs["completion_ids"].shape
    monkeypatch.setattr(trainer, "use_vllm", True)
    monkeypatch.setattr(trainer, "vllm_importance_sampling_correction", True)
    inputs["importance_sampling_ratio"] = 0.5 + torch.rand(shape, generator=g)
    _compare(trainer, inputs)
    # DeepSeek-V3.2's off-policy mask: drop negative-advantage sequences whose sampler drifted (needs logps)
    monkeypatch.setattr(trainer, "off_policy_mask_threshold", 0.05)
    inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] - torch.rand(shape, generator=g)
    _compare(trainer, inputs)


def test_unsupported_options_are_named(setup, tmp_path, monkeypatch):
    trainer, _ = setup
    monkeypatch.setattr(trainer, "loss_type", "cispo")
    monkeypatch.setattr(trainer, "top_entropy_quantile", 0.2)
    problems = unsupported_options(trainer)
    assert any("cispo" in p for p in problems) and any("top_entropy_quantile" in p for p in problems)
    with pytest.raises(ValueError, match="loss_type='sapo'"):
        _trainer(trainer.args.output_dir.replace("out", "model"), tmp_path, loss_type="sapo")


def test_one_training_step_end_to_end(setup, tmp_path):
    trainer, _ = setup
    path = trainer.args.output_dir.replace("out", "model")
    fresh = _trainer(path, tmp_path, beta=0.0, learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    fresh.train()
    moved = [n for n, p in fresh.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) > len(before) // 2
    logged = fresh.state.log_history[0]
    assert "entropy" in logged and "clip_ratio/region_mean" in logged and logged["entropy"] > 0
