"""The MoE permutation index against a plain loop: every backend (C++ CPU, CUDA with CUB on a GPU, the torch
fallback), alignment, unrouted slots, empty experts, T = 0 and 1, the GPU row bound, bad input."""

import importlib

import pytest
import torch
from conftest import HAS_GPU

import r1kernels
from r1kernels.moe import reference as ref

perm_module = importlib.import_module("r1kernels.moe.permutation")
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])


def _ids(T, k, E, device, drop=0.0):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32) if T else torch.zeros(0, k)
    ids = ids.to(torch.int32)
    if drop:
        ids[torch.rand(ids.shape) < drop] = -1
    return ids.to(device)


def _check(index, ids, E, align):
    counts, offsets, row_of, source, row_expert = ref.permutation_index(ids.cpu(), E, align)
    got = [t.cpu().long() for t in index]
    assert torch.equal(got[0], counts) and torch.equal(got[1], offsets) and torch.equal(got[2], row_of)
    used = int(offsets[-1])
    assert torch.equal(got[3][:used], source) and torch.equal(got[4][:used], row_expert)
    assert (got[3][used:] == -1).all() and (got[4][used:] == -1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,k,E,align,drop", [(300, 6, 64, 1, 0.0), (300, 6, 64, 128, 0.1), (1, 8, 256, 128, 0.0),
                                              (0, 4, 8, 16, 0.0), (9000, 2, 12, 8, 0.3)], ids=str)  # fmt: skip
def test_matches_reference(device, T, k, E, align, drop):
    ids = _ids(T, k, E, device, drop)
    _check(r1kernels.moe.permutation_index(ids, E, align=align), ids, E, align)


def test_gpu_row_bound_and_torch_fallback():
    """The bound a GPU allocates (no host sync), run through the torch fallback on CPU tensors."""
    E, align = 16, 32
    ids = _ids(200, 4, E, "cpu", 0.05)
    bound = r1kernels.moe.max_rows(ids.numel(), E, align)
    out = perm_module._outputs(ids, E, bound)
    perm_module._torch_index(ids, E, align, out)
    _check(out, ids, E, align)
    _check(r1kernels.moe.permutation_index(ids, E, align=align, num_rows=bound), ids, E, align)
    assert out.source.shape == (bound,) and bound % align == 0


def test_skewed_routing_and_empty_experts():
    ids = torch.full((500, 2), 3, dtype=torch.int32)
    ids[:, 1] = 7
    index = r1kernels.moe.permutation_index(ids, 10, align=128)
    assert index.counts.tolist() == [0, 0, 0, 500, 0, 0, 0, 500, 0, 0]
    assert index.offsets.tolist() == [0, 0, 0, 0, 512, 512, 512, 512, 1024, 1024, 1024]
    _check(index, ids, 10, 128)


def test_bad_input():
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[-1, num_experts\)"):
        r1kernels.moe.permutation_index(torch.tensor([[0, 8]], dtype=torch.int32), 8)
    with pytest.raises(TypeError, match="expert_ids must have dtype"):
        r1kernels.moe.permutation_index(torch.tensor([[0, 1]]), 8)
    with pytest.raises(ValueError, match=r"num_rows .* too small"):
        r1kernels.moe.permutation_index(torch.tensor([[0, 1]], dtype=torch.int32), 8, align=4, num_rows=4)
