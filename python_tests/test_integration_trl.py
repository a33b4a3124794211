"""``R1GRPOTrainer``: on the same generated batch, r1kernels' fused loss gives TRL's loss, every parameter's gradient
and TRL's logged metrics for each loss type, importance-sampling level, KL setting, mask and correction TRL offers
and the fused loss expresses; the old / reference log-probs equal TRL's; it runs under DDP with
``find_unused_parameters=True``; unsupported options are named; one real ``train()`` step runs end to end. A tiny
DeepSeek-V3 and a word-level tokenizer are built here (no downloads)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("trl")
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

import r1kernels.integrations.trl as r1k_trl
from r1kernels.grpo import token_logprobs
from r1kernels.integrations.trl import R1GRPOTrainer, apply_r1kernels_to_grpo_trainer, unsupported_options

WORDS = ["<pad>", "<eos>"] + [f"w{i}" for i in range(30)]
METRICS = ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
           "clip_ratio/low_min", "clip_ratio/high_max")  # fmt: skip


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
    return [float(len(c.split())) + 0.1 * (sum(map(ord, c)) % 7) for c in completions]  # deterministic, spread


def _trainer(path, tmp_path, cls=R1GRPOTrainer, **config):
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, report_to="none", use_cpu=True, max_steps=1, logging_steps=1,
                      seed=0, **{"bf16": False, **config})  # fmt: skip
    return cls(model=path, reward_funcs=_reward, args=args, train_dataset=_dataset(), processing_class=_tokenizer())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One trainer (beta > 0 so it holds a reference model; two iterations so TRL computes old log-probs), the
    saved model's path and one generated, scored batch that both losses see."""
    tmp = tmp_path_factory.mktemp("trl")
    path = _saved_model(tmp / "model")
    trainer = _trainer(path, tmp, beta=0.05, num_iterations=2)
    torch.manual_seed(1)
    inputs = trainer._generate_and_score_completions([_dataset()[i] for i in range(4)])
    # the policy has not moved since sampling, nor from the reference: shift the old and reference log-probs so
    # the ratios leave 1 on both sides (alternating tokens; per sequence too, for the sequence-level clip) and the
    # KL term and its gradient are not zero
    g = torch.Generator().manual_seed(2)
    B, T = inputs["completion_ids"].shape
    alternate = 0.4 * (1 - 2 * (torch.arange(T) % 2))
    inputs["old_per_token_logps"] += (
        alternate + 0.25 * torch.randn(B, 1, generator=g) + 0.1 * torch.randn(B, T, generator=g)
    )
    inputs["ref_per_token_logps"] += 0.3 * torch.randn(B, T, generator=g)
    trainer.model.train()
    return trainer, inputs, path


@pytest.fixture
def trainer(setup, monkeypatch):
    """The shared trainer, every attribute a test changes restored afterwards."""
    t = setup[0]
    for name, value in (("loss_type", "dapo"), ("importance_sampling_level", "token"), ("beta", 0.05),
                        ("current_gradient_accumulation_steps", 1)):  # fmt: skip
        monkeypatch.setattr(t, name, value, raising=False)
    return t


def _loss_and_grads(trainer, model, inputs, loss_fn):
    model.zero_grad(set_to_none=True)
    for v in trainer._metrics.values():
        v.clear()
    loss = loss_fn(trainer, model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, metrics


def _compare(trainer, inputs, model=None, tol=1e-5, metrics=METRICS):
    """TRL's loss and ours on one batch: the loss, every gradient (relative Frobenius error) and the metrics."""
    model = trainer.model if model is None else model
    want, want_grads, want_metrics = _loss_and_grads(trainer, model, inputs, GRPOTrainer._compute_loss)
    got, grads, got_metrics = _loss_and_grads(trainer, model, inputs, type(trainer)._compute_loss)
    assert float(got) == pytest.approx(float(want), rel=tol, abs=1e-8)
    assert grads.keys() == want_grads.keys() and len(grads) > 10
    for name, g in want_grads.items():
        err = float((grads[name] - g).norm() / g.norm().clamp_min(1e-12))
        assert err < tol, f"{name}: {err:.2e}"
    assert {k for k in want_metrics if k in metrics} == {k for k in got_metrics if k in metrics}
    for key in metrics:
        if key in want_metrics:
            assert got_metrics[key] == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-7), key
    return want_metrics


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_gradients_and_metrics_match_trl(trainer, setup, loss_type, level):
    trainer.loss_type, trainer.importance_sampling_level = loss_type, level
    metrics = _compare(trainer, setup[1])
    if level == "token":  # the batch really clips on both sides and carries a KL
        assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0 and metrics["kl"] > 0


@pytest.mark.parametrize("case", ["on-policy", "beta 0", "k3 without ratio", "delta", "per-token advantages",
                                  "accumulation", "eval", "token-weighted clip metrics"])  # fmt: skip
def test_options_map_one_to_one(trainer, setup, case, monkeypatch):
    inputs = dict(setup[1])
    metrics = METRICS
    if case == "on-policy":
        del inputs["old_per_token_logps"]
    elif case == "beta 0":
        trainer.beta = 0.0
    elif case == "k3 without ratio":
        monkeypatch.setattr(trainer.args, "use_bias_correction_kl", False)
    elif case == "delta":
        monkeypatch.setattr(trainer.args, "delta", 1.1)
        monkeypatch.setattr(trainer, "epsilon_high", 0.05)
    elif case == "per-token advantages":
        g = torch.Generator().manual_seed(4)
        inputs["advantages"] = inputs["advantages"][:, None] + torch.randn(inputs["completion_ids"].shape, generator=g)
    elif case == "accumulation":  # dapo's normaliser and the others' division by the accumulation steps
        trainer.current_gradient_accumulation_steps = 2
        monkeypatch.setattr(trainer.args, "steps_per_generation", 4)
        _compare(trainer, inputs)
        trainer.loss_type = "grpo"
    elif case == "eval":  # no accumulation scaling in eval
        trainer.current_gradient_accumulation_steps = 2
        trainer.model.eval()
    elif case == "token-weighted clip metrics":  # without the probe pass: the token-level means still match
        monkeypatch.setattr(trainer, "per_sequence_clip_metrics", False)
        metrics = METRICS[:5]
    try:
        if case == "eval":
            want = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
            assert float(R1GRPOTrainer._compute_loss(trainer, trainer.model, inputs)) == pytest.approx(float(want))
        else:
            _compare(trainer, inputs, metrics=metrics)
    finally:
        trainer.model.train()


def test_vllm_correction_off_policy_and_entropy_masks(trainer, setup, monkeypatch):
    inputs = dict(setup[1])
    trainer.loss_type = "bnpo"
    g = torch.Generator().manual_seed(3)
    shape = inputs["completion_ids"].shape
    monkeypatch.setattr(trainer, "use_vllm", True)
    monkeypatch.setattr(trainer, "vllm_importance_sampling_correction", True)
    inputs["importance_sampling_ratio"] = 0.5 + torch.rand(shape, generator=g)
    _compare(trainer, inputs)
    # DeepSeek-V3.2's off-policy mask: drop negative-advantage sequences whose sampler drifted
    monkeypatch.setattr(trainer, "off_policy_mask_threshold", 0.05)
    inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] - torch.rand(shape, generator=g)
    _compare(trainer, inputs)
    # the high-entropy token mask (Beyond the 80/20 Rule), with a sequence-level vLLM ratio
    monkeypatch.setattr(trainer, "top_entropy_quantile", 0.4)
    inputs["importance_sampling_ratio"] = 0.5 + torch.rand(shape[0], 1, generator=g)
    _compare(trainer, inputs)


@pytest.mark.parametrize("plant, factor", [("beta", 1.1), ("epsilon_high", 0.5), ("temperature", 1.1)])
def test_the_comparison_catches_planted_mistakes(trainer, setup, plant, factor, monkeypatch):
    """A wrong KL weight, upper clip or temperature, on our side only, fails the check."""
    inputs, wrong = setup[1], getattr(trainer, plant) * factor
    original = R1GRPOTrainer._fused_loss

    def planted(self, *args):
        with monkeypatch.context() as m:
            m.setattr(self, plant, wrong)
            return original(self, *args)

    monkeypatch.setattr(R1GRPOTrainer, "_fused_loss", planted)
    with pytest.raises(AssertionError):
        _compare(trainer, inputs, metrics=())


def test_old_and_reference_logprobs_match_trl(trainer, setup, monkeypatch):
    inputs = setup[1]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    K = inputs["completion_ids"].size(1)
    assert (inputs["completion_mask"] == 0).any()  # padded completions are covered
    calls = []
    monkeypatch.setattr(r1k_trl, "token_logprobs", lambda *a, **k: calls.append(1) or token_logprobs(*a, **k))
    with torch.no_grad():
        for model, entropy in ((trainer.model, True), (trainer.ref_model, False)):
            want = GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, att, K, 2, entropy)
            got = trainer._get_per_token_logps_and_entropies(model, ids, att, K, 2, entropy)
            for w, o in zip(want[:2], got[:2], strict=True):
                assert (w is None) == (o is None)
                if w is not None:
                    assert o.shape == w.shape and float((o - w).abs().max()) < 1e-5
    assert len(calls) == 4  # r1kernels computed them: two models, two chunks of 2 sequences


def test_ddp_with_find_unused_parameters(setup, tmp_path):
    """HF's default DDP setting: a head used outside the forward fails ('mark a variable ready only once')."""
    fresh = _trainer(setup[2], tmp_path, beta=0.05)
    fresh.model.train()
    fresh.current_gradient_accumulation_steps = 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(fresh.model, find_unused_parameters=True)
        _compare(fresh, setup[1], model=ddp)
    finally:
        dist.destroy_process_group()


def test_unsupported_options_are_named(trainer, setup, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "loss_type", "cispo")
    monkeypatch.setattr(trainer, "_entropy_bonus_enabled", True)
    monkeypatch.setattr(trainer.model.config, "final_logit_softcapping", 30.0, raising=False)
    problems = " | ".join(unsupported_options(trainer))
    for name in ("cispo", "entropy bonus", "final_logit_softcapping"):
        assert name in problems
    with pytest.raises(ValueError, match="loss_type='sapo'"):
        _trainer(setup[2], tmp_path, loss_type="sapo")
    plain = _trainer(setup[2], tmp_path, cls=GRPOTrainer, loss_type="vespo")
    with pytest.raises(ValueError, match="loss_type='vespo'"):
        apply_r1kernels_to_grpo_trainer(plain)
    assert type(plain) is GRPOTrainer  # unchanged
    with pytest.raises(ValueError, match="pixel_values"):
        R1GRPOTrainer._compute_loss(trainer, trainer.model, {**setup[1], "pixel_values": torch.rand(4, 3)})


def test_patch_an_existing_trainer(setup, tmp_path):
    plain = _trainer(setup[2], tmp_path, cls=GRPOTrainer, beta=0.05, loss_type="grpo")
    patched = apply_r1kernels_to_grpo_trainer(plain)
    assert patched is plain and type(plain) is R1GRPOTrainer
    assert apply_r1kernels_to_grpo_trainer(plain) is plain  # idempotent
    plain.model.train()
    plain.current_gradient_accumulation_steps = 1
    _compare(plain, setup[1])


@pytest.mark.parametrize("fp32_head", [False, True])
def test_bf16_autocast(setup, tmp_path, fp32_head):
    """Under bf16 mixed precision the head runs at autocast's dtype, as TRL's does (equal within bf16 rounding),
    or in fp32 with cast_lm_head_to_fp32 (then the bf16 backbone is the same on both sides: equal to fp32 rounding
    of the head)."""
    mixed = _trainer(setup[2], tmp_path, beta=0.05, bf16=True, cast_lm_head_to_fp32=fp32_head)
    assert mixed.accelerator.mixed_precision == "bf16"
    mixed.model.train()
    mixed.current_gradient_accumulation_steps = 1
    _compare(mixed, setup[1], tol=1e-5 if fp32_head else 1e-2, metrics=())


def test_one_training_step_end_to_end(setup, tmp_path):
    fresh = _trainer(setup[2], tmp_path, beta=0.04, learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    fresh.train()
    moved = [n for n, p in fresh.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) > len(before) // 2
    logged = fresh.state.log_history[0]
    for key in METRICS:
        assert key in logged, key
    assert logged["entropy"] > 0 and logged["kl"] >= 0
