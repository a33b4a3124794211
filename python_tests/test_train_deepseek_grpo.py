"""The GRPO loop on the tiny DeepSeek-V3: a micro run (warm-up, sampling through the paged-cache decode path,
rewards, the fused loss with its float64 check on every step, the routing-bias update) runs end to end; a
checkpoint resumes to the same next step bit for bit; the CLI writes its logs, plot and summary."""

import json
import os

import pytest
import torch

from r1kernels.mla import layer as mla_layer
from r1kernels.model import ModelConfig
from r1kernels.moe import layer as moe_layer
from r1kernels.train.__main__ import main
from r1kernels.train.deepseek_grpo import Config, Trainer, _completion_mask, train
from r1kernels.train.validate import KernelMismatch

MICRO = dict(model=ModelConfig(vocab_size=19), warmup_steps=2, prompts=2, group=4, max_new_tokens=6, check_every=1)


def test_completion_mask_stops_after_the_first_eos():
    c = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8]])
    assert _completion_mask(c, eos=1).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_micro_run_checks_every_step():
    out = train(Config(**MICRO, steps=3), log=lambda *_: None)
    assert len(out["history"]) == 3 and out["worst_reference_error"] < 1e-3
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in out["history"])


def test_checkpoint_resumes_bit_for_bit(tmp_path):
    cfg = Config(**MICRO, steps=3)
    first = Trainer(cfg)
    first.warmup()
    first.grpo_step()
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    expected = first.grpo_step()
    resumed = Trainer(cfg)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    got = resumed.grpo_step()
    assert json.dumps(got) == json.dumps(expected)
    for (name, a), b in zip(first.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_cli_writes_logs_plot_and_summary(tmp_path):
    out = str(tmp_path / "run")
    assert main(["--steps", "2", "--warmup-steps", "1", "--prompts", "2", "--group", "2", "--out", out]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and {"reward", "kl", "entropy", "routing_max_over_mean"} <= set(json.loads(lines[0]))
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"first_reward", "last_reward", "pass_at_1"} <= set(summary)
    assert main(["--steps", "3", "--warmup-steps", "1", "--prompts", "2", "--group", "2", "--out", out,
                 "--resume", os.path.join(out, "checkpoint.pt")]) == 0  # fmt: skip
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("family", ["moe", "mla"])
def test_validation_names_the_family_of_a_wrong_kernel(monkeypatch, family):
    """A kernel path off by 1%: the whole-model check at step 0 stops the run and names the op family."""
    if family == "moe":
        real = moe_layer.swiglu
        monkeypatch.setattr(moe_layer, "swiglu", lambda h: real(h) * 1.01)
    else:
        real_attention = mla_layer.mla_attention

        def off(*args, **kw):
            out, lse = real_attention(*args, **kw)
            return out * 1.01, lse

        monkeypatch.setattr(mla_layer, "mla_attention", off)
    trainer = Trainer(Config(**MICRO, steps=1))
    trainer.warmup()
    with pytest.raises(KernelMismatch, match=f"op family '{family}'"):
        trainer.grpo_step()


def _plant(monkeypatch, where: str, scale: float) -> None:
    """Scale one kernel's result: an FP8 linear's fprop / dgrad GEMM or weight gradient, the FP8 experts' weight
    gradient, the routed experts' SwiGLU, or the MLA attention core's output."""
    import importlib

    from r1kernels.fp8 import linear as fp8_linear

    fp8_grouped_linear = importlib.import_module("r1kernels.moe.fp8_grouped_linear")  # the package's name is the op
    module, name = {"fp8 linear gemm": (fp8_linear, "gemm_nt"), "fp8 linear wgrad": (fp8_linear, "wgrad_gemm"),
                    "fp8 experts wgrad": (fp8_grouped_linear, "grouped_wgrad_gemm"), "swiglu": (moe_layer, "swiglu"),
                    "attention": (mla_layer, "mla_attention")}[where]  # fmt: skip
    real = getattr(module, name)
    if where == "attention":
        monkeypatch.setattr(module, name, lambda *a, **k: (real(*a, **k)[0] * scale, None))
    else:
        monkeypatch.setattr(module, name, lambda *a, **k: real(*a, **k) * scale)


# each case: a 1% output or 3% weight-gradient error in one kernel; the family it must be pinned on (every
# family has FP8 linears: attention projections, the dense MLP, the shared expert), and what
PLANTED = [("bfloat16", True, "fp8 linear wgrad", 0.97, "mla|dense|moe", "gradient of weight"),
           ("bfloat16", True, "fp8 linear gemm", 1.01, "mla|dense|moe", ""),
           ("bfloat16", True, "fp8 experts wgrad", 0.97, "moe", "gradient of gate_up_proj|gradient of down_proj"),
           ("bfloat16", False, "attention", 1.01, "mla", ""),
           ("bfloat16", False, "swiglu", 1.01, "moe", ""),
           ("float32", True, "fp8 linear wgrad", 0.97, "mla|dense|moe", "gradient of weight")]  # fmt: skip


def _trainer_with_gradients(dtype: str, fp8: bool) -> Trainer:
    """After the warm-up, the policy moved off its frozen reference (noise of 3% of each parameter's spread):
    the KL term then has a gradient everywhere even when every completion of a group scores the same (at a
    micro model's first step they all score 0, and with policy == reference the gradient is exactly 0 in both
    paths, which would leave nothing for a gradient check to see)."""
    trainer = Trainer(Config(**{**MICRO, "model": ModelConfig(vocab_size=19, fp8=fp8), "dtype": dtype}, steps=1))
    trainer.warmup()
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.03 * p.float().std().to(p.dtype))
    return trainer


@pytest.mark.parametrize("dtype,fp8,where,scale,family,what", PLANTED)
def test_validation_catches_a_wrong_kernel_in_bf16_and_fp8(monkeypatch, dtype, fp8, where, scale, family, what):
    """The calibrated bars still stop the run on a wrong kernel in bf16 and with the FP8 recipe, naming the
    family: a 3% weight-gradient error leaves every output right, so only the gradient checks can see it."""
    trainer = _trainer_with_gradients(dtype, fp8)
    _plant(monkeypatch, where, scale)
    with pytest.raises(KernelMismatch, match=f"op family '({family})[^']*' \\(({what})") as caught:
        trainer.grpo_step()
    assert "relative error" in str(caught.value)


@pytest.mark.parametrize("dtype,fp8", [("bfloat16", False), ("bfloat16", True), ("float32", True)])
def test_bf16_and_fp8_steps_pass_their_enforced_checks(dtype, fp8):
    """Right kernels pass every enforced bar, and each kind of check ran: block outputs, ops, end to end."""
    from r1kernels.train.deepseek_grpo import TOLERANCES

    record = _trainer_with_gradients(dtype, fp8).grpo_step()
    bars = TOLERANCES[(dtype, fp8)]
    for family in ("moe", "mla"):
        assert 0 < record[f"kernel_error/{family}"] <= bars.gradients
        assert record[f"kernel_error/{family} outputs"] <= bars.outputs
        assert 0 <= record[f"kernel_error/{family} ops"] <= bars.ops  # in bf16 often exactly 0: same roundings
    assert 0 < record["kernel_error/mla attention gradients"] <= bars.attention_gradients
    if fp8:
        assert 0 <= record["kernel_error/moe fp8 experts"] <= bars.fp8_experts
    if fp8:  # the dense layer's MLP is FP8 too
        assert record["kernel_error/dense / norms / embeddings ops"] <= bars.ops


def test_per_family_errors_are_logged():
    trainer = Trainer(Config(**MICRO, steps=1))
    trainer.warmup()
    record = trainer.grpo_step()
    families = {k for k in record if k.startswith("kernel_error/")}
    assert {"kernel_error/moe", "kernel_error/mla", "kernel_error/grpo / lm_head", "kernel_error/loss"} <= families
    assert record["worst_kernel_error"] < 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path is for machines without a GPU")
def test_cli_triton_backend_from_a_fresh_process(tmp_path):
    """`python -m r1kernels.train --backend triton` imports triton before main() runs: it re-runs itself with
    TRITON_INTERPRET=1. In bf16 with the FP8 recipe every family's Triton kernels run in the interpreter: FP8
    quantization, dense and grouped GEMMs (forward, dgrad, wgrad), MoE rows and SwiGLU, MLA training attention
    and paged decode, the GRPO loss (routing and the permutation index are C++). Three new tokens a sample keep
    the interpreter's decode steps few."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "r1kernels.train", "--steps", "1", "--warmup-steps", "1", "--prompts", "1",
           "--group", "2", "--out", str(tmp_path / "run"), "--backend", "triton", "--dtype", "bfloat16",
           "--fp8", "--check-every", "1", "--max-new-tokens", "3"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "worst float64-reference error" in out.stdout
