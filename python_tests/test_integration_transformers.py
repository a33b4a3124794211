"""``apply_r1kernels_to_deepseek_v3``: a tiny random transformers DeepSeek-V3 gives the same logits, loss,
gradients and greedy generations patched and unpatched, and the r1kernels ops are the ones that ran."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

import r1kernels.integrations.transformers as r1k_hf  # noqa: E402
from r1kernels.fp8 import FP8Linear  # noqa: E402
from r1kernels.fp8.reference import calc_diff  # noqa: E402

VOCAB = 97


def _config(**kw) -> DeepseekV3Config:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
                routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=32,
                qk_nope_head_dim=32, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
                tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)  # fmt: skip
    return DeepseekV3Config(**{**base, **kw})


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """HF initialises the router weight and correction bias to zeros (every routing a tie): draw them."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.05)
    return model


def _model(**kw) -> DeepseekV3ForCausalLM:
    return _randomise(DeepseekV3ForCausalLM(_config(**kw)).float())


@pytest.fixture
def calls(monkeypatch):
    """Counts the r1kernels ops the patched forwards call (so an equivalence cannot pass by running HF's code)."""
    counts = {"mla_attention": 0, "route": 0, "routed_experts": 0}

    def counting(name):
        original = getattr(r1k_hf, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(r1k_hf, name, wrapper)

    for name in counts:
        counting(name)
    return counts


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_same(ref, model, ids, tol=1e-5):
    _assert_close(_forward_backward(ref, ids), _forward_backward(model, ids), tol)


def _assert_close(want, got, tol=1e-5):
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = want, got
    assert _rel(logits_b, logits_a) < tol
    assert abs(float(loss_b) - float(loss_a)) < tol * abs(float(loss_a))
    for name, g in grads_a.items():
        assert g is not None and grads_b[name] is not None, name
        assert _rel(grads_b[name], g) < tol, (name, _rel(grads_b[name], g))


def test_instance_patch_matches_transformers_logits_loss_and_every_gradient(calls):
    torch.manual_seed(0)
    ref = _model()
    model = copy.deepcopy(ref)
    assert r1k_hf.apply_r1kernels_to_deepseek_v3(model) == []
    assert r1k_hf.apply_r1kernels_to_deepseek_v3(model) == []  # idempotent
    ids = torch.randint(2, VOCAB, (3, 17))
    _assert_same(ref, model, ids)
    # 3 layers of attention (forward); 2 MoE layers (router + experts), once each per forward
    assert calls == {"mla_attention": 3, "route": 2, "routed_experts": 2}
    assert model.config._experts_implementation == "r1kernels"


def test_greedy_generation_is_unchanged_and_prefill_runs_the_kernels(calls):
    torch.manual_seed(1)
    ref = _model()
    model = copy.deepcopy(ref)
    r1k_hf.apply_r1kernels_to_deepseek_v3(model)
    prompt = torch.randint(2, VOCAB, (2, 6))
    kw = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(prompt))
    want = ref.generate(prompt, **kw)
    got = model.generate(prompt, **kw)
    assert torch.equal(got, want)
    assert calls["mla_attention"] == 3  # the prefill; decode steps over the filled cache take HF's path
    assert calls["route"] == calls["routed_experts"] == 2 * 5  # every step routes


def test_padding_mask_takes_transformers_attention(calls):
    torch.manual_seed(2)
    ref = _model()
    model = copy.deepcopy(ref)
    r1k_hf.apply_r1kernels_to_deepseek_v3(model)
    ids = torch.randint(2, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: a mask with holes
    want = ref(ids, attention_mask=mask).logits
    got = model(ids, attention_mask=mask).logits
    assert _rel(got, want) < 1e-5
    assert calls["mla_attention"] == 0 and calls["route"] == 2


def test_packed_sequences_through_cu_seq_lens_match_each_sequence_alone():
    torch.manual_seed(3)
    model = _model()
    attn = model.model.layers[0].self_attn
    lengths = [5, 8, 3]
    hidden = torch.randn(1, sum(lengths), 64)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 5, 13, 16], dtype=torch.int32)
    rotary = model.model.rotary_emb
    packed, _ = r1k_hf.attention_forward(attn, hidden, rotary(hidden, positions), None, None, cu_seq_lens_q=cu,
                                         cu_seq_lens_k=cu)  # fmt: skip
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        piece = hidden[:, lo:hi]
        alone, _ = r1k_hf.attention_forward(attn, piece, rotary(piece, positions[:, lo:hi]), None, None)
        assert _rel(packed[:, lo:hi], alone) < 1e-6


def test_class_patch_before_construction_and_revert(calls):
    torch.manual_seed(4)
    ref = _model()
    ids = torch.randint(2, VOCAB, (2, 11))
    want = _forward_backward(ref, ids)  # before the patch: a class patch reaches built models too
    try:
        r1k_hf.apply_r1kernels_to_deepseek_v3()
        model = DeepseekV3ForCausalLM(_config()).float()
        model.load_state_dict(ref.state_dict())
        _assert_close(want, _forward_backward(model, ids))
        assert calls == {"mla_attention": 3, "route": 2, "routed_experts": 2}
    finally:
        r1k_hf.revert_r1kernels_deepseek_v3()
    plain = DeepseekV3ForCausalLM(_config())
    plain(torch.randint(2, VOCAB, (1, 4)))
    assert calls == {"mla_attention": 3, "route": 2, "routed_experts": 2}  # HF's code again after revert


def test_experts_selected_by_name_in_the_config(calls):
    torch.manual_seed(5)
    r1k_hf.apply_r1kernels_to_deepseek_v3(moe=False, attention=False)  # registers the names only
    try:
        ref = _model()
        assert ref.config._experts_implementation == "grouped_mm"
        model = DeepseekV3ForCausalLM(_config(experts_implementation="r1kernels")).float()
        model.load_state_dict(ref.state_dict())
        assert model.config._experts_implementation == "r1kernels"
        _assert_same(ref, model, torch.randint(2, VOCAB, (2, 10)))
        assert calls == {"mla_attention": 0, "route": 0, "routed_experts": 2}
    finally:
        r1k_hf.revert_r1kernels_deepseek_v3()


@pytest.mark.parametrize("attention,moe", [(True, False), (False, True)])
def test_switches_patch_only_their_part(calls, attention, moe):
    torch.manual_seed(6)
    ref = _model()
    model = copy.deepcopy(ref)
    r1k_hf.apply_r1kernels_to_deepseek_v3(model, attention=attention, moe=moe)
    _assert_same(ref, model, torch.randint(2, VOCAB, (2, 7)))
    assert calls == {"mla_attention": 3 * attention, "route": 2 * moe, "routed_experts": 2 * moe}


def test_fp8_linears_stay_close_to_the_unquantized_model(calls):
    torch.manual_seed(7)
    ref = _model()
    model = copy.deepcopy(ref)
    skipped = r1k_hf.apply_r1kernels_to_deepseek_v3(model, fp8_linear=True)
    assert skipped == []
    fp8 = [n for n, m in model.named_modules() if isinstance(m, FP8Linear)]
    # 3 layers x 5 attention linears, 1 dense MLP x 3, 2 shared experts x 3; never the LM head or embeddings
    assert len(fp8) == 3 * 5 + 3 + 2 * 3 and not any("lm_head" in n or "embed" in n for n in fp8)
    assert model.config._experts_implementation == "r1kernels_fp8"
    assert model.state_dict().keys() == ref.state_dict().keys()
    ids = torch.randint(2, VOCAB, (2, 12))
    logits_a, _, grads_a = _forward_backward(ref, ids)
    logits_b, _, grads_b = _forward_backward(model, ids)
    # e4m3 with 1x128 / 128x128 scales: DeepGEMM's calc_diff ~1e-3 per GEMM; the stack compounds a few
    assert calc_diff(logits_b, logits_a) < 5e-3
    diffs = sorted(calc_diff(grads_b[n], g) for n, g in grads_a.items())
    # the router's gradient reaches it only through the FP8 experts' outputs: the loosest (seen up to 0.04)
    assert diffs[-1] < 0.1 and diffs[len(diffs) // 2] < 5e-3
    assert calls["routed_experts"] == 2


def test_rejects_a_model_without_deepseek_v3_layers():
    with pytest.raises(TypeError, match="DeepseekV3DecoderLayer"):
        r1k_hf.apply_r1kernels_to_deepseek_v3(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        r1k_hf.apply_r1kernels_to_deepseek_v3("DeepseekV3ForCausalLM")
