"""Grouped FP8 GEMM over expert segments (DeepGEMM's contiguous layout) against the float64 reference: every
backend, padding rows and padding-only tiles, empty experts, the sm_80 decode and sm_90a TMA paths, bad ids."""

import importlib

import pytest
import torch
from conftest import HAS_GPU, backends_for

import r1kernels
from r1kernels.fp8 import reference as ref

gemm_kernels = importlib.import_module("r1kernels.fp8.kernels.gemm_nt")
gemm_module = importlib.import_module("r1kernels.fp8.gemm_nt")


def _experts(G, N, K, device):
    pairs = [r1kernels.fp8.quantize_per_block(torch.randn(N, K, device=device) * K**-0.5) for _ in range(G)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _rows(segments, K, device):
    """segments: (expert, rows) in order; each padded with -1 rows to a multiple of 128."""
    ids = []
    for e, n in segments:
        ids += [e] * n + [-1] * (-n % 128)
    m_indices = torch.tensor(ids, dtype=torch.int32, device=device)
    a, sa = r1kernels.fp8.quantize_per_token_group(torch.randn(len(ids), K, device=device))
    return a, sa, m_indices


def _check(backend, device, G, N, K, segments, out_dtype=torch.float32):
    b, sb = _experts(G, N, K, device)
    a, sa, ids = _rows(segments, K, device)
    with r1kernels.use_backend(backend):
        d = r1kernels.fp8.grouped_gemm_nt_contiguous(a, sa, b, sb, ids, out_dtype=out_dtype)
    r = ref.grouped_gemm_nt_contiguous(a.cpu(), sa.cpu(), b.cpu(), sb.cpu(), ids.cpu())
    assert d.shape == (a.shape[0], N) and not torch.isnan(d).any()
    assert float((d.double().cpu() - r).norm() / r.norm()) < (1e-6 if out_dtype == torch.float32 else 4e-3)
    assert torch.equal(d.cpu()[ids.cpu() < 0], torch.zeros_like(d.cpu()[ids.cpu() < 0]))


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("segments", [[(2, 90), (0, 128), (3, 5)], [(2, 3), (0, 1), (3, 12)]],
                         ids=["full", "decode"])  # fmt: skip
def test_segments_with_padding_and_an_empty_expert(backend, device, out_dtype, segments):
    # expert 1 has no rows; expert 3's rows leave a 64-row tile that is all padding. "decode": few real rows
    # (the CPU computes them from the codes, row blocks split where the expert changes)
    _check(backend, device, 4, 257, 208, segments, out_dtype)


def test_sm80_decode_and_tma_paths(kernel_device, monkeypatch):
    monkeypatch.setattr(gemm_module, "hw_fp8_convert", lambda arch: False)
    _check("triton", kernel_device, 3, 130, 144, [(1, 70), (0, 200)])
    monkeypatch.undo()
    if not HAS_GPU:  # the descriptor path, forced in the interpreter
        monkeypatch.setattr(gemm_kernels, "use_tma", lambda arch, fp8_mma, *operands: True)
        _check("triton", "cpu", 3, 130, 144, [(1, 70), (0, 200)])


@pytest.mark.parametrize(
    "ids,match",
    [
        ([0] * 100 + [3] * 28, r"m_indices must lie in \[-1, G\)"),
        ([0] * 64 + [1] * 64, "one expert"),
        ([-1] * 64 + [1] * 64, "one expert"),  # a segment's expert is its first row's: padding comes last
        ([-2] * 128, r"m_indices must lie in \[-1, G\)"),
    ],
)
def test_bad_ids(ids, match):
    b, sb = _experts(3, 130, 144, "cpu")
    a, sa = r1kernels.fp8.quantize_per_token_group(torch.randn(128, 144))
    with pytest.raises(ValueError, match=match):
        r1kernels.fp8.grouped_gemm_nt_contiguous(a, sa, b, sb, torch.tensor(ids, dtype=torch.int32))


def test_rows_must_come_in_segments_of_128():
    b, sb = _experts(2, 130, 144, "cpu")
    a, sa = r1kernels.fp8.quantize_per_token_group(torch.randn(100, 144))
    with pytest.raises(ValueError, match="multiple of 128 rows"):
        r1kernels.fp8.grouped_gemm_nt_contiguous(a, sa, b, sb, torch.zeros(100, dtype=torch.int32))


_TYPE_ERRORS = [  # (operand, replacement, message): each operand's dtype and rank, the ids' contiguity, a non-tensor
    ("a", lambda t: t.float(), "a must have dtype"),
    ("a_scales", lambda t: t.double(), "a_scales must have dtype"),
    ("b", lambda t: t.view(torch.uint8), "b must have dtype"),
    ("b_scales", lambda t: t.half(), "b_scales must have dtype"),
    ("ids", lambda t: t.long(), "must have dtype"),
    ("a", lambda t: t[..., None], "a must be"),
    ("a_scales", lambda t: t[None], "a_scales must be"),
    ("b", lambda t: t[0], "b must be 3-D"),
    ("b_scales", lambda t: t[0], "b_scales must be 3-D"),
    ("ids", lambda t: torch.stack([t, t], 1)[:, 0], "must be contiguous"),
    ("ids", lambda t: t.tolist(), "must be a torch.Tensor"),
]


@pytest.mark.parametrize("operand,change,match", _TYPE_ERRORS, ids=[f"{o}-{m}" for o, _, m in _TYPE_ERRORS])
def test_contiguous_operand_types_are_checked(operand, change, match):
    b, sb = _experts(2, 130, 144, "cpu")
    a, sa = r1kernels.fp8.quantize_per_token_group(torch.randn(128, 144))
    args = {"a": a, "a_scales": sa, "b": b, "b_scales": sb, "ids": torch.zeros(128, dtype=torch.int32)}
    args[operand] = change(args[operand])
    with pytest.raises((TypeError, ValueError), match=match):
        r1kernels.fp8.grouped_gemm_nt_contiguous(*args.values())


@pytest.mark.parametrize("operand,change,match", _TYPE_ERRORS, ids=[f"{o}-{m}" for o, _, m in _TYPE_ERRORS])
def test_masked_operand_types_are_checked(operand, change, match):
    a, sa, b, sb = _masked_operands(2, 6, 130, 144, "cpu")
    args = {"a": a, "a_scales": sa, "b": b, "b_scales": sb, "ids": torch.tensor([3, 4], dtype=torch.int32)}
    args[operand] = change(args[operand])
    with pytest.raises((TypeError, ValueError), match=match):
        r1kernels.fp8.grouped_gemm_nt_masked(*args.values())


def _masked_operands(G, M, N, K, device):
    groups = [r1kernels.fp8.quantize_per_token_group(torch.randn(M, K, device=device)) for _ in range(G)]
    a, sa = torch.stack([x for x, _ in groups]), torch.stack([s for _, s in groups])
    b, sb = _experts(G, N, K, device)
    return a, sa, b, sb


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,counts", [(80, [80, 0, 33]), (6, [6, 0, 2])], ids=["full", "decode"])
def test_masked_layout(backend, device, out_dtype, M, counts):
    """Full, empty and partial groups; rows past masked_m come back 0."""
    a, sa, b, sb = _masked_operands(3, M, 257, 208, device)
    masked_m = torch.tensor(counts, dtype=torch.int32, device=device)
    with r1kernels.use_backend(backend):
        d = r1kernels.fp8.grouped_gemm_nt_masked(a, sa, b, sb, masked_m, out_dtype=out_dtype)
    r = ref.grouped_gemm_nt_masked(a.cpu(), sa.cpu(), b.cpu(), sb.cpu(), masked_m.cpu())
    assert d.shape == (3, M, 257) and not torch.isnan(d).any()
    assert float((d.double().cpu() - r).norm() / r.norm()) < (1e-6 if out_dtype == torch.float32 else 4e-3)
    assert torch.equal(d[1].cpu(), torch.zeros(M, 257, dtype=out_dtype))
    assert torch.equal(d[2, counts[2] :].cpu(), torch.zeros(M - counts[2], 257, dtype=out_dtype))


@pytest.mark.skipif(HAS_GPU, reason="forces the sm_90a descriptor path on CPU tensors; on a GPU the arch decides")
def test_masked_layout_tma_path_in_the_interpreter(monkeypatch):
    monkeypatch.setattr(gemm_kernels, "use_tma", lambda arch, fp8_mma, *operands: True)
    a, sa, b, sb = _masked_operands(2, 70, 130, 144, "cpu")
    masked_m = torch.tensor([5, 70], dtype=torch.int32)
    with r1kernels.use_backend("triton"):
        d = r1kernels.fp8.grouped_gemm_nt_masked(a, sa, b, sb, masked_m, out_dtype=torch.float32)
    r = ref.grouped_gemm_nt_masked(a, sa, b, sb, masked_m)
    assert float((d.double() - r).norm() / r.norm()) < 1e-6 and torch.equal(d[0, 5:], torch.zeros(65, 130))


@pytest.mark.parametrize("M", [16, 40], ids=["few-rows-c++", "blocked"])
@pytest.mark.parametrize("bad", ["too-many", "negative"])
def test_masked_counts_are_checked(M, bad):
    a, sa, b, sb = _masked_operands(2, M, 130, 144, "cpu")
    counts = [3, M + 1] if bad == "too-many" else [-1, 3]
    with pytest.raises(ValueError, match=r"masked_m must lie in \[0, M\]"):
        r1kernels.fp8.grouped_gemm_nt_masked(a, sa, b, sb, torch.tensor(counts, dtype=torch.int32))
    with pytest.raises(ValueError, match="one entry per group"):
        r1kernels.fp8.grouped_gemm_nt_masked(a, sa, b[:1], sb[:1], torch.tensor([3, 4], dtype=torch.int32))


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_persistent_grid_walks_every_work_item(kernel_device, monkeypatch, tma):
    """The grouped layouts run a persistent grid of (SMs x resident programs) programs; with one SM a single
    program walks every (group, tile) item, padding tiles and empty groups included, in both layouts."""
    if tma and HAS_GPU:
        pytest.skip("forces the sm_90a descriptor path on CPU tensors; on a GPU the arch decides")
    if tma:
        monkeypatch.setattr(gemm_kernels, "use_tma", lambda arch, fp8_mma, *operands: True)
    launched = []
    monkeypatch.setattr(r1kernels.backend, "sm_count", lambda device: 1)
    monkeypatch.setattr(
        gemm_module, "launch", lambda kernel, grid, *a, **k: (launched.append(grid), real(kernel, grid, *a, **k))
    )
    real = importlib.import_module("r1kernels._launch").launch
    _check("triton", kernel_device, 4, 257, 144, [(2, 90), (0, 128), (3, 5)])
    a, sa, b, sb = _masked_operands(3, 70, 130, 144, kernel_device)
    masked_m = torch.tensor([70, 0, 33], dtype=torch.int32, device=kernel_device)
    with r1kernels.use_backend("triton"):
        d = r1kernels.fp8.grouped_gemm_nt_masked(a, sa, b, sb, masked_m, out_dtype=torch.float32)
    r = ref.grouped_gemm_nt_masked(a.cpu(), sa.cpu(), b.cpu(), sb.cpu(), masked_m.cpu())
    assert float((d.double().cpu() - r).norm() / r.norm()) < 1e-6
    assert torch.equal(d[2, 33:].cpu(), torch.zeros(37, 130))
    assert launched == [(1,), (1,)]


def _odd_expert_stride(t):  # same values, 8 codes between experts' blocks: not 16-element aligned
    flat = torch.cat([t.reshape(-1), t.reshape(-1)[:8]])
    return torch.cat([flat, flat[:8]]).as_strided(t.shape, (t.shape[1] * t.shape[2] + 8, t.shape[2], 1))


_GROUPED_RULE_BREAKS = [  # the grouped forms' own rules, checked on what the one-pass read returns
    ("contiguous", "b_scales", lambda t: t[:1], "block grid per expert"),
    ("contiguous", "ids", lambda t: t[:64], "one expert id per row"),
    ("contiguous", "b", _odd_expert_stride, "expert stride"),
    ("masked", "b_scales", lambda t: t[:1], "one entry per group"),
    ("masked", "ids", lambda t: t[:1], "one entry per group"),
    ("masked", "b", _odd_expert_stride, "group stride"),
]


@pytest.mark.parametrize("form,operand,change,match", _GROUPED_RULE_BREAKS,
                         ids=[f"{f}-{o}-{m}" for f, o, _, m in _GROUPED_RULE_BREAKS])  # fmt: skip
def test_grouped_rules_are_checked_on_the_fast_path(form, operand, change, match):
    if form == "contiguous":
        b, sb = _experts(2, 130, 144, "cpu")
        a, sa = r1kernels.fp8.quantize_per_token_group(torch.randn(128, 144))
        args = {"a": a, "a_scales": sa, "b": b, "b_scales": sb, "ids": torch.zeros(128, dtype=torch.int32)}
        op = r1kernels.fp8.grouped_gemm_nt_contiguous
    else:
        a, sa, b, sb = _masked_operands(2, 6, 130, 144, "cpu")
        args = {"a": a, "a_scales": sa, "b": b, "b_scales": sb, "ids": torch.tensor([3, 4], dtype=torch.int32)}
        op = r1kernels.fp8.grouped_gemm_nt_masked
    args[operand] = change(args[operand])
    with pytest.raises(ValueError, match=match):
        op(*args.values())
