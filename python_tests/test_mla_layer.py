"""The MLA layer: HF transformers' DeepseekV3Attention state dict loads and the outputs match it (plain rope
and YaRN, with and without q LoRA; when transformers is installed); the absorbed decode path over the paged
cache gives the training path's outputs; gradients reach every weight; the Triton path agrees."""

import pytest
import torch
from conftest import backends_for

import r1kernels

YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
DIMS = dict(hidden_size=64, num_attention_heads=3, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64,
            v_head_dim=32)  # fmt: skip


def _layer(q_lora_rank=32, rope_scaling=None):
    torch.manual_seed(3)
    layer = r1kernels.mla.MLA(**DIMS, q_lora_rank=q_lora_rank, rope_scaling=rope_scaling)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.1)
    return layer


@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["rope", "yarn"])
@pytest.mark.parametrize("q_lora_rank", [32, None], ids=["q_lora", "q_proj"])
def test_matches_hf_deepseek_v3_attention(rope_scaling, q_lora_rank):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    rope = {**(rope_scaling or {"rope_type": "default"}), "rope_theta": 10000.0}
    config = transformers.DeepseekV3Config(**DIMS, num_key_value_heads=3, q_lora_rank=q_lora_rank,
                                           rope_parameters=rope, max_position_embeddings=2560,
                                           attn_implementation="eager")  # fmt: skip
    hf = DeepseekV3Attention(config, 0)
    ours = _layer(q_lora_rank, rope_scaling)
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(2, 20, 64)
    positions = torch.arange(20).expand(2, 20)
    mask = torch.full((20, 20), float("-inf")).triu(1)[None, None]
    y_hf, _ = hf(x, DeepseekV3RotaryEmbedding(config)(x, positions), mask)
    assert torch.allclose(ours(x, positions), y_hf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_seqlen", [None, 12, 30])
def test_packed_sequences_equal_separate_calls(max_seqlen):
    """Two sequences packed in one row (cu_seqlens, positions restarting) give what each gives alone, with or
    without the max_seqlen bound (12: the longest, 30: any larger bound)."""
    layer = _layer()
    x = torch.randn(1, 21, 64)
    positions = torch.cat([torch.arange(9), torch.arange(12)])[None]
    cu = torch.tensor([0, 9, 21], dtype=torch.int32)
    packed = layer(x, positions, cu_seqlens=cu, max_seqlen=max_seqlen)
    alone = torch.cat([layer(x[:, :9], positions[:, :9]), layer(x[:, 9:], positions[:, 9:])], 1)
    assert torch.allclose(packed, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["rope", "yarn"])
def test_absorbed_decode_equals_training_path(rope_scaling):
    layer = _layer(rope_scaling=rope_scaling)
    B, S = 2, 21
    x = torch.randn(B, S, 64)
    positions = torch.arange(S).expand(B, S)
    full = layer(x, positions)
    cache = torch.full((8, 16, 576), float("nan"))  # unused slots are never read
    table = torch.randperm(8).view(B, 4).int()
    lengths = torch.zeros(B, dtype=torch.int32)
    outs = []
    for lo, hi in ((0, 17), (17, 19), (19, 21)):  # a prefill, then two speculative-decoding steps of 2
        y, lengths = layer.decode(x[:, lo:hi], positions[:, lo:hi], cache, table, lengths)
        outs.append(y)
    assert lengths.tolist() == [S, S]
    assert torch.allclose(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", backends_for())
def test_gradients_and_the_triton_path(backend, device):
    layer = _layer().to(device)
    x = torch.randn(2, 19, 64, device=device)
    with r1kernels.use_backend("cpu" if device == "cpu" else backend):
        reference = layer(x)
    layer16 = _layer().to(device).to(torch.bfloat16)
    x16 = x.to(torch.bfloat16).requires_grad_()
    with r1kernels.use_backend(backend):
        y = layer16(x16)
        y.float().square().sum().backward()
    rel = (y.float() - reference).norm() / reference.norm()
    assert rel < 3e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer16.parameters())
    assert x16.grad is not None and torch.isfinite(x16.grad).all()
