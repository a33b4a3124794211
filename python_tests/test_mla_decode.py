"""MLA decode over a paged latent cache against float64: the Triton split-KV path (interpreter or GPU) and the
torch path, page sizes 16 / 32 / 64, head counts 1 / 3 / 16 / 63, s_q 1 and 2 (bottom-right causal), lengths
0 and 1, a permuted block table, unused slots holding NaN; the cache append; bad input."""

import pytest
import torch
from conftest import backends_for

import r1kernels
from r1kernels.mla import reference as ref


def _case(B, s_q, H, page, lengths, device, dtype):
    blocks_per_seq = max(1, -(-max(lengths) // page))
    nb = B * blocks_per_seq + 2
    cache = torch.randn(nb, page, 576)
    table = torch.randperm(nb)[: B * blocks_per_seq].view(B, blocks_per_seq).int()
    lengths = torch.tensor(lengths, dtype=torch.int32)
    unused = torch.ones(nb, page, dtype=torch.bool)
    for b, n in enumerate(lengths.tolist()):
        for j in range(n):
            unused[table[b, j // page], j % page] = False
    clean = cache.clone()
    cache[unused] = float("nan")  # never read
    q = torch.randn(B, s_q, H, 576)
    kernel_args = tuple(t.to(device) for t in (q.to(dtype), cache.to(dtype), table, lengths))
    return kernel_args, (q.to(dtype), clean.to(dtype), table, lengths)


def _paths():
    out = []
    for p in backends_for():
        backend, device = p.values
        dtypes = (torch.bfloat16,) if backend == "triton" else (torch.float32, torch.bfloat16, torch.float16)
        out += [pytest.param(backend, device, dt, id=f"{backend}-{str(dt)[6:]}") for dt in dtypes]
    return out


@pytest.mark.parametrize("backend,device,dtype", _paths())
@pytest.mark.parametrize("B,s_q,H,page,lengths", [(3, 1, 3, 16, [37, 0, 1]), (2, 2, 16, 32, [70, 1]),
                                                  (1, 1, 63, 64, [130]), (2, 2, 1, 16, [5, 33])], ids=str)  # fmt: skip
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_matches_reference(backend, device, dtype, B, s_q, H, page, lengths, causal):
    args, ref_args = _case(B, s_q, H, page, lengths, device, dtype)
    with r1kernels.use_backend(backend):
        out, lse = r1kernels.mla.mla_decode(*args, softmax_scale=0.05, causal=causal)
    r_out, r_lse = ref.mla_decode(*ref_args, 0.05, causal)
    assert out.shape == (B, s_q, H, 512) and lse.shape == (B, H, s_q) and not torch.isnan(out).any()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.cpu().double(), r_out, rtol=tol, atol=tol)
    empty = torch.isinf(r_lse)
    assert torch.equal(torch.isinf(lse.cpu()), empty) and (lse.cpu()[empty] > 0).all()
    assert torch.allclose(lse.cpu().double()[~empty], r_lse[~empty], rtol=1e-4, atol=1e-4)


def test_append_to_cache_then_decode_sees_the_new_keys():
    _, (q, cache, table, lengths) = _case(2, 1, 4, 16, [20, 3], "cpu", torch.float32)
    new = torch.randn(2, 5, 576)
    grown = r1kernels.mla.append_to_cache(cache, table, lengths, new)
    assert grown.tolist() == [25, 8]
    for b, n in enumerate(lengths.tolist()):
        for i in range(5):
            pos = n + i
            assert torch.equal(cache[table[b, pos // 16], pos % 16], new[b, i])
    out, _ = r1kernels.mla.mla_decode(q, cache, table, grown, softmax_scale=0.05)
    assert torch.allclose(out.double(), ref.mla_decode(q, cache, table, grown, 0.05)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["c++", "torch"])
def test_append_to_cache_writes_only_new_slots_and_checks_first(form):
    """The CPU's C++ append (dense inputs) and the torch form (here: strided latents): the new rows land in their
    slots across a page boundary and nothing else changes; lengths past the table, a table entry outside the cache
    for a page the new rows need, or a negative length raise the named error with the cache untouched."""
    _, (_q, cache, table, lengths) = _case(3, 1, 4, 16, [14, 0, 40], "cpu", torch.float32)  # 3 pages each
    wide = torch.randn(3, 3, 2 * 576)
    new = wide[..., ::2] if form == "torch" else wide[..., :576].contiguous()
    assert new.is_contiguous() == (form == "c++")
    before = cache.clone()
    grown = r1kernels.mla.append_to_cache(cache, table, lengths, new)
    assert grown.dtype == torch.int32 and grown.tolist() == [17, 3, 43]
    touched = torch.zeros(cache.shape[:2], dtype=torch.bool)
    for b, n in enumerate(lengths.tolist()):
        for i in range(3):
            block, slot = int(table[b, (n + i) // 16]), (n + i) % 16
            assert torch.equal(cache[block, slot], new[b, i])
            touched[block, slot] = True
    assert torch.equal(cache[~touched], before[~touched])
    cases = [
        (torch.tensor([14, 0, 62], dtype=torch.int32), table, r"cache_seqlens must lie in \[0, block_table"),
        (lengths, table.index_fill(1, torch.tensor([2]), cache.shape[0]), r"block_table's used entries"),
        (torch.tensor([14, -2, 31], dtype=torch.int32), table, r"cache_seqlens must lie in \[0, block_table"),
    ]
    for bad_lengths, bad_table, match in cases:
        snapshot = cache.clone()
        with pytest.raises(ValueError, match=match):
            r1kernels.mla.append_to_cache(cache, bad_table, bad_lengths, new)
        assert torch.equal(cache, snapshot)


def test_bad_input():
    (q, cache, table, lengths), _ = _case(2, 1, 2, 16, [20, 3], "cpu", torch.float32)
    decode = r1kernels.mla.mla_decode
    with pytest.raises(TypeError, match="block_table must be int32"):
        decode(q, cache, table.long(), lengths, softmax_scale=0.1)
    with pytest.raises(ValueError, match="page size must be one of"):
        decode(q, cache[:, :8].contiguous(), table, lengths, softmax_scale=0.1)
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, block_table"):
        decode(q, cache, table, torch.tensor([20, 40], dtype=torch.int32), softmax_scale=0.1)
    bad_table = table.clone()
    bad_table[1, 0] = cache.shape[0]  # a page sequence 1 uses
    with pytest.raises(ValueError, match=r"block_table's used entries must lie in \[0, num_blocks\)"):
        decode(q, cache, bad_table, lengths, softmax_scale=0.1)
    bad_table[1, 0], bad_table[0, 1] = table[1, 0], -1  # sequence 0 uses 2 pages of 16: its second is used too
    with pytest.raises(ValueError, match="block_table's used entries"):
        decode(q, cache, bad_table, lengths, softmax_scale=0.1)
    with pytest.raises(ValueError, match="576 columns"):
        decode(q[..., :512].contiguous(), cache, table, lengths, softmax_scale=0.1)
    with pytest.raises(ValueError, match="head_dim_v must be 512"):
        decode(q, cache, table, lengths, softmax_scale=0.1, head_dim_v=256)
    # the rest of the rules the one-read check holds (mla/decode._valid), each broken once
    with pytest.raises(ValueError, match="q must be contiguous"):
        decode(torch.cat([q, q], 3)[..., ::2], cache, table, lengths, softmax_scale=0.1)
    with pytest.raises(ValueError, match="kv_cache must be contiguous"):
        decode(q, torch.cat([cache, cache], 2)[..., ::2], table, lengths, softmax_scale=0.1)
    with pytest.raises(TypeError, match="kv_cache must have dtype"):
        decode(q, cache.double(), table, lengths, softmax_scale=0.1)
    with pytest.raises(ValueError, match="one row per sequence"):
        decode(q, cache, table, lengths[:1].contiguous(), softmax_scale=0.1)
    with pytest.raises(ValueError, match="block_table must be 2-D"):
        decode(q, cache, table[0], lengths, softmax_scale=0.1)
