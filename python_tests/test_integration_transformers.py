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
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0,
        "mscale_all_dim": 1.0, "rope_theta": 10000.0}  # fmt: skip
# two shapes of the model: q LoRA + group-limited routing + interleaved rope; plain q_proj + one group + YaRN
# (its softmax scale is not head_dim ** -0.5) + HF's half-split rope
VARIANTS = {
    "q_lora-groups": {},
    "q_proj-yarn": dict(q_lora_rank=None, n_group=1, topk_group=1, rope_interleave=False, rope_parameters=YARN),
}


def _config(**kw) -> DeepseekV3Config:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
                routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=32,
                qk_nope_head_dim=32, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
                max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)  # fmt: skip
    return DeepseekV3Config(**{**base, **kw})


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """HF initialises the router weight and correction bias to zeros (every routing a tie): draw them all."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.05)
    return model


def _model(**kw) -> DeepseekV3ForCausalLM:
    return _randomise(DeepseekV3ForCausalLM(_config(**kw)).float())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small gain nothing from threads; on a shared CPU they only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture
def class_patch():
    """Whatever a test patches on the classes is undone after it, pass or fail."""
    yield r1k_hf.apply_r1kernels_to_deepseek_v3
    r1k_hf.revert_r1kernels_deepseek_v3()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_close(want, got, tol=1e-5):
    """fp32: the two differ only in summation order (attention blocks, expert GEMMs): a few ulp, far below what
    a wrong routing choice, mask or scale gives (~1e-1)."""
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = want, got
    assert _rel(logits_b, logits_a) < tol
    assert abs(float(loss_b) - float(loss_a)) < tol * abs(float(loss_a))
    assert grads_b.keys() == grads_a.keys()
    for name, g in grads_a.items():
        assert g is not None and grads_b[name] is not None, name
        assert _rel(grads_b[name], g) < tol, (name, _rel(grads_b[name], g))


@pytest.mark.parametrize("variant", VARIANTS)
def test_instance_patch_matches_transformers_logits_loss_and_every_gradient(calls, variant):
    ref = _model(**VARIANTS[variant])
    model = copy.deepcopy(ref)
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert r1k_hf.apply_r1kernels_to_deepseek_v3(model) == []
    assert r1k_hf.apply_r1kernels_to_deepseek_v3(model) == []  # idempotent
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == storage  # same parameters, no copies
    assert model.state_dict().keys() == ref.state_dict().keys()
    ids = torch.randint(2, VOCAB, (3, 17))
    _assert_close(_forward_backward(ref, ids), _forward_backward(model, ids))
    # 3 layers of attention; 2 MoE layers (router + experts), once each per forward
    assert calls == {"mla_attention": 3, "route": 2, "routed_experts": 2}
    assert model.config._experts_implementation == "r1kernels"


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_greedy_generation_is_unchanged_and_the_prefill_runs_the_kernels(calls, cache_implementation):
    ref = _model()
    model = copy.deepcopy(ref)
    r1k_hf.apply_r1kernels_to_deepseek_v3(model)
    prompt = torch.randint(2, VOCAB, (2, 6))
    kw = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(prompt))
    if cache_implementation:  # its prefill attends over the empty static buffer: HF slices, we use the new latents
        kw["cache_implementation"] = cache_implementation
    want = ref.generate(prompt, **kw)
    got = model.generate(prompt, **kw)
    assert got.shape == (2, 11) and torch.equal(got, want)
    assert calls["mla_attention"] == 3  # the prefill; decode steps over the filled cache take HF's path
    assert calls["route"] == calls["routed_experts"] == 2 * 5  # every step routes


def test_padding_mask_takes_transformers_attention(calls):
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


def _packed_problem(model, lengths):
    hidden = torch.randn(1, sum(lengths), model.config.hidden_size)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    bounds = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return hidden, positions, bounds, model.model.rotary_emb(hidden, positions)


def _each_alone(attn, model, hidden, positions, bounds):
    """The reference: every packed sequence run through the attention on its own."""
    out = []
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        piece = hidden[:, lo:hi]
        out.append(r1k_hf.attention_forward(attn, piece, model.model.rotary_emb(piece, positions[:, lo:hi]), None)[0])
    return torch.cat(out, dim=1)


def test_packed_sequences_through_cu_seq_lens_match_each_sequence_alone(calls):
    model = _model()
    attn = model.model.layers[1].self_attn
    hidden, positions, cu, rotary = _packed_problem(model, [5, 8, 3])
    packed, _ = r1k_hf.attention_forward(attn, hidden, rotary, None, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert _rel(packed, _each_alone(attn, model, hidden, positions, cu)) < 1e-6
    # HF's own forward on each sequence agrees too (the patched forward is not compared only with itself)
    lo, hi = int(cu[1]), int(cu[2])
    hf, _ = r1k_hf._hf_attention(attn)(hidden[:, lo:hi], model.model.rotary_emb(hidden[:, lo:hi], positions[:, lo:hi]),
                                       None, None)  # fmt: skip
    assert _rel(packed[:, lo:hi], hf) < 1e-5
    assert calls["mla_attention"] == 1 + 3


def test_flash_implementations_read_packed_sequences_from_restarting_positions(calls):
    model = _model()
    attn = copy.copy(model.model.layers[1].self_attn)
    hidden, positions, cu, rotary = _packed_problem(model, [4, 7, 6])
    # as under attn_implementation="flash_attention_2" (not installable here: the config says so by hand)
    attn.config = copy.copy(model.config)
    attn.config._attn_implementation_internal = "flash_attention_2"
    packed, _ = r1k_hf.attention_forward(attn, hidden, rotary, None, None, position_ids=positions)
    assert _rel(packed, _each_alone(attn, model, hidden, positions, cu)) < 1e-6
    # sdpa reads no packing from positions (transformers builds a mask when it means to): one causal sequence
    sdpa, _ = r1k_hf.attention_forward(model.model.layers[1].self_attn, hidden, rotary, None, None,
                                       position_ids=positions)  # fmt: skip
    assert _rel(sdpa, packed) > 1e-2
    assert calls["mla_attention"] == 1 + 3 + 1


def test_a_callers_is_causal_false_is_honoured_as_sdpa_does(calls):
    model = _model()
    attn = model.model.layers[0].self_attn
    hidden, _, _, rotary = _packed_problem(model, [9])
    for causal in (False, True):
        got, _ = r1k_hf.attention_forward(attn, hidden, rotary, None, None, is_causal=causal)
        want, _ = r1k_hf._hf_attention(attn)(hidden, rotary, None, None, is_causal=causal)
        assert _rel(got, want) < 1e-5
    assert _rel(*(r1k_hf.attention_forward(attn, hidden, rotary, None, None, is_causal=c)[0] for c in (0, 1))) > 1e-2
    assert calls["mla_attention"] == 4


def test_class_patch_before_construction_reaches_new_models_and_reverts(calls, class_patch):
    ref = _model()
    ids = torch.randint(2, VOCAB, (2, 11))
    want = _forward_backward(ref, ids)  # before the patch: a class patch reaches built models too
    class_patch()
    class_patch()  # twice: harmless
    model = DeepseekV3ForCausalLM(_config()).float()
    model.load_state_dict(ref.state_dict())
    assert model.config._experts_implementation == "r1kernels"
    _assert_close(want, _forward_backward(model, ids))
    assert calls == {"mla_attention": 3, "route": 2, "routed_experts": 2}
    # a name given explicitly still wins over the patched default
    explicit = DeepseekV3ForCausalLM(_config(experts_implementation="grouped_mm"))
    assert explicit.config._experts_implementation == "grouped_mm"
    r1k_hf.revert_r1kernels_deepseek_v3()
    plain = DeepseekV3ForCausalLM(_config())
    assert plain.config._experts_implementation == "grouped_mm"
    plain(torch.randint(2, VOCAB, (1, 4)))
    assert calls == {"mla_attention": 3, "route": 2, "routed_experts": 2}  # HF's code again after revert


def test_class_patch_with_fp8_converts_layers_as_they_are_built(class_patch):
    class_patch(attention=False, moe=False, fp8_linear=True)
    model = DeepseekV3ForCausalLM(_config())
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert len(fp8) == 3 * 5 + 3 + 2 * 3 and not any("lm_head" in n or "embed" in n or ".gate." in n for n in fp8)
    assert model.config._experts_implementation == "grouped_mm"  # moe=False: HF's default stays
    class_patch(fp8_linear=True)
    assert DeepseekV3ForCausalLM(_config()).config._experts_implementation == "r1kernels_fp8"


def test_experts_selected_by_name_in_the_config(calls):
    # importing the module registered the names: no patch call, only the config
    ref = _model()
    assert ref.config._experts_implementation == "grouped_mm"
    model = DeepseekV3ForCausalLM(_config(experts_implementation="r1kernels")).float()
    model.load_state_dict(ref.state_dict())
    assert model.config._experts_implementation == "r1kernels"
    ids = torch.randint(2, VOCAB, (2, 10))
    _assert_close(_forward_backward(ref, ids), _forward_backward(model, ids))
    assert calls == {"mla_attention": 0, "route": 0, "routed_experts": 2}
    ref.set_experts_implementation("r1kernels_fp8")
    assert calc_diff(ref(ids).logits, model(ids).logits) < 5e-3
    assert calls["routed_experts"] == 6


def test_experts_skip_the_ids_transformers_marks_as_on_another_rank():
    model = _model()
    experts = model.model.layers[1].mlp.experts
    T, k, E = 11, 3, experts.gate_up_proj.shape[0]
    x = torch.randn(T, model.config.hidden_size, requires_grad=True)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    ids[::3, 0] = E  # expert parallelism: E marks an expert that lives on another rank (no contribution here)
    weights = torch.rand(T, k, requires_grad=True)
    got = r1k_hf.experts_forward(experts, x, ids, weights)
    model.set_experts_implementation("eager")  # HF's loop over experts, which skips id E
    want = experts(x, ids, weights)
    assert _rel(got, want) < 1e-6
    grads = torch.autograd.grad(got.square().sum(), (x, weights))
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (x, weights)), strict=True):
        assert _rel(g, w) < 1e-5


@pytest.mark.parametrize("attention,moe", [(True, False), (False, True)])
def test_switches_patch_only_their_part(calls, attention, moe):
    ref = _model()
    model = copy.deepcopy(ref)
    r1k_hf.apply_r1kernels_to_deepseek_v3(model, attention=attention, moe=moe)
    ids = torch.randint(2, VOCAB, (2, 7))
    _assert_close(_forward_backward(ref, ids), _forward_backward(model, ids))
    assert calls == {"mla_attention": 3 * attention, "route": 2 * moe, "routed_experts": 2 * moe}
    assert model.config._experts_implementation == ("r1kernels" if moe else "grouped_mm")


def test_fp8_linears_stay_close_to_the_unquantized_model(calls):
    # every token to every expert: no discrete routing choice that an FP8 rounding could flip (a flipped choice
    # moves an expert's gradient by ~0.1 however right the kernels are), so each gradient has a tight bound
    ref = _model(num_experts_per_tok=8, n_group=1, topk_group=1)
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
    # e4m3 with 1x128 / 128x128 scales: DeepGEMM's calc_diff ~1e-3 per GEMM, compounding through the stack
    # (over 60 seeds: logits <= 1.3e-3, the worst gradient <= 1.5e-2; a wrong scale or layout gives > 0.1)
    assert calc_diff(logits_b, logits_a) < 5e-3
    for name, g in grads_a.items():
        assert calc_diff(grads_b[name], g) < 4e-2, (name, calc_diff(grads_b[name], g))
    assert calls["routed_experts"] == 2


def test_fp8_leaves_out_what_does_not_fit_and_says_so():
    # q LoRA rank 40 and expert width 24 are not multiples of 16: q_a_proj / q_b_proj and the experts stay
    model = _model(q_lora_rank=40, moe_intermediate_size=24)
    skipped = r1k_hf.apply_r1kernels_to_deepseek_v3(model, fp8_linear=True)
    layers = model.model.layers
    want = [f"model.layers.{i}.self_attn.{n}" for i in range(3) for n in ("q_a_proj", "q_b_proj")]
    want += [f"model.layers.{i}.mlp.shared_experts.{n}" for i in (1, 2) for n in ("gate_proj", "up_proj", "down_proj")]
    assert sorted(skipped) == sorted([*want, "model.layers.1.mlp.experts", "model.layers.2.mlp.experts"])
    assert type(layers[0].self_attn.q_a_proj) is torch.nn.Linear and isinstance(layers[0].self_attn.o_proj, FP8Linear)
    assert model.config._experts_implementation == "r1kernels"
    model(torch.randint(2, VOCAB, (1, 5)))  # runs
    model.set_experts_implementation("r1kernels_fp8")
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        model(torch.randint(2, VOCAB, (1, 5)))


class _Adapter(torch.nn.Module):
    """PEFT's LoRA layer in miniature: the original linear as ``base_layer`` plus a low-rank path."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base_layer = base
        self.down = torch.nn.Linear(base.in_features, 4, bias=False)
        self.up = torch.nn.Linear(4, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.up(self.down(x))


def test_fp8_reaches_linears_an_adapter_wraps():
    model = _model()
    attn = model.model.layers[0].self_attn
    attn.o_proj = _Adapter(attn.o_proj)
    r1k_hf.apply_r1kernels_to_deepseek_v3(model, attention=False, moe=False, fp8_linear=True)
    assert isinstance(attn.o_proj.base_layer, FP8Linear)
    assert type(attn.o_proj.down) is torch.nn.Linear  # the adapter's own linears are not the recipe's


def test_a_bfloat16_model_matches_transformers_in_bfloat16(calls):
    ref = _model()
    model = copy.deepcopy(ref)
    r1k_hf.apply_r1kernels_to_deepseek_v3(model)
    ids = torch.randint(2, VOCAB, (2, 13))
    exact = ref(ids).logits
    ref, model = ref.to(torch.bfloat16), model.to(torch.bfloat16)  # buffers too: the correction bias in bf16
    want, got = ref(ids).logits, model(ids).logits
    assert got.dtype == torch.bfloat16 and calls["mla_attention"] == 3
    # each as far from the fp32 model as the other: bf16 rounding, not a different computation
    # (over 60 seeds: rel(got, want) <= 5e-3; the patched model's error is 0.95-1.05x HF's)
    assert _rel(got, want) < 1e-2
    assert _rel(got, exact) < 1.25 * _rel(want, exact)


def test_rejects_bad_arguments():
    with pytest.raises(TypeError, match="DeepseekV3DecoderLayer"):
        r1k_hf.apply_r1kernels_to_deepseek_v3(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        r1k_hf.apply_r1kernels_to_deepseek_v3("DeepseekV3ForCausalLM")
    with pytest.raises(TypeError, match="fp8_linear must be a bool"):
        r1k_hf.apply_r1kernels_to_deepseek_v3(None, fp8_linear="yes")
    model = DeepseekV3ForCausalLM(_config(hidden_act="gelu"))
    with pytest.raises(ValueError, match="hidden_act"):
        r1k_hf.apply_r1kernels_to_deepseek_v3(model)
    r1k_hf.apply_r1kernels_to_deepseek_v3(model, moe=False)  # attention alone does not care
