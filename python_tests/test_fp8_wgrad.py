"""FP8 weight-gradient pieces: the fused transpose-and-quantize (bytes against the reference), the wgrad GEMM
and its per-expert grouped form (against float64 and, by DeepGEMM's metric, the unquantized product), on every
backend, with odd token counts, padding rows holding NaN, empty experts, the sm_80 and TMA paths, bad input."""

import importlib

import pytest
import torch
from conftest import HAS_GPU, backends_for

import r1kernels
from r1kernels.fp8 import reference as ref

gemm_kernels = importlib.import_module("r1kernels.fp8.kernels.gemm_nt")
gemm_module = importlib.import_module("r1kernels.fp8.gemm_nt")
grouped_wgrad_module = importlib.import_module("r1kernels.fp8.grouped_wgrad_gemm")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view(torch.uint8)


def _rel(d, r) -> float:
    assert not torch.isnan(d).any(), "NaN in output"
    return float((d.double().cpu() - r).norm() / r.norm())


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("T,C", [(1, 16), (37, 144), (300, 200), (256, 128)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
def test_transposed_and_rowwise_bytes_match_reference(backend, device, T, C, dtype):
    x = (torch.randn(T, C) * torch.logspace(-3, 3, C)).to(dtype)
    with r1kernels.use_backend(backend):
        q, s, qt, st = r1kernels.fp8.quantize_rowwise_and_transposed(x.to(device))
        qt_only, st_only = r1kernels.fp8.quantize_transposed(x.to(device))
    rq, rs = ref.quantize_per_token_group(x)
    rqt, rst = ref.quantize_transposed(x)
    assert qt.shape == (C, -(-T // 16) * 16) and st.shape == (C, -(-T // 128))
    assert torch.equal(_bytes(q), _bytes(rq)) and torch.equal(s.cpu(), rs)
    assert torch.equal(_bytes(qt), _bytes(rqt)) and torch.equal(st.cpu(), rst)
    assert torch.equal(_bytes(qt_only), _bytes(rqt)) and torch.equal(st_only.cpu(), rst)


@pytest.mark.parametrize("backend,device", backends_for())
def test_transposed_reads_row_strided_input(backend, device):
    wide = torch.randn(150, 200).to(torch.bfloat16)
    x = wide[:, 30:174]  # row stride 200, 144 columns
    with r1kernels.use_backend(backend):
        q, s, qt, st = r1kernels.fp8.quantize_rowwise_and_transposed(x.to(device))
    rq, rs = ref.quantize_per_token_group(x.contiguous())
    rqt, rst = ref.quantize_transposed(x.contiguous())
    assert torch.equal(_bytes(q), _bytes(rq)) and torch.equal(s.cpu(), rs)
    assert torch.equal(_bytes(qt), _bytes(rqt)) and torch.equal(st.cpu(), rst)


@pytest.mark.parametrize("backend,device", backends_for())
def test_padding_rows_are_zeroed_and_nan_propagates(backend, device):
    x = torch.randn(200, 144)
    ids = torch.tensor([0] * 150 + [-1] * 50, dtype=torch.int32)
    x[160] = float("nan")  # a padding row: ignored
    x[3, 7] = float("inf")  # a real row: its column's first token group dequantizes to NaN, nothing else
    with r1kernels.use_backend(backend):
        q, _s, qt, st = r1kernels.fp8.quantize_rowwise_and_transposed(x.to(device), m_indices=ids.to(device))
    _rqt, rst = ref.quantize_transposed(x, ids)
    finite = torch.isfinite(rst)
    assert torch.equal(st.cpu()[finite], rst[finite]) and torch.isinf(st.cpu()[7, 0])
    assert finite.sum() == finite.numel() - 1
    deq = ref.dequantize_tiles(qt.cpu()[:, :200], st.cpu(), 1, 128)
    assert torch.isnan(deq[7, :128]).all() and torch.isfinite(deq[[c for c in range(144) if c != 7]]).all()
    assert torch.equal(_bytes(qt)[:, 150:], torch.zeros(144, 58, dtype=torch.uint8))
    assert torch.equal(_bytes(q)[160], torch.zeros(144, dtype=torch.uint8))


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("T,N,K", [(37, 130, 144), (300, 70, 208), (256, 257, 16), (5, 12, 48)], ids=str)
def test_wgrad_matches_reference(backend, device, T, N, K):
    dy, x = torch.randn(T, N), torch.randn(T, K)
    with r1kernels.use_backend(backend):
        a, sa = r1kernels.fp8.quantize_transposed(dy.to(device))
        b, sb = r1kernels.fp8.quantize_transposed(x.to(device))
        c = torch.randn(N, K, device=device)
        d = r1kernels.fp8.wgrad_gemm(a, sa, b, sb, c=c)
    assert d.shape == (N, K) and d.dtype == torch.float32
    assert _rel(d, ref.wgrad_gemm(a.cpu(), sa.cpu(), b.cpu(), sb.cpu()) + c.cpu().double()) < 1e-6
    if T >= 256:
        assert ref.calc_diff(d.cpu() - c.cpu(), dy.T @ x) < 1e-3


def test_wgrad_sm80_decode_and_tma_paths(kernel_device, monkeypatch):
    dy, x = torch.randn(300, 130, device=kernel_device), torch.randn(300, 144, device=kernel_device)
    a, sa = r1kernels.fp8.quantize_transposed(dy)
    b, sb = r1kernels.fp8.quantize_transposed(x)
    r = ref.wgrad_gemm(a.cpu(), sa.cpu(), b.cpu(), sb.cpu())
    monkeypatch.setattr(gemm_module, "hw_fp8_convert", lambda arch: False)
    with r1kernels.use_backend("triton"):
        assert _rel(r1kernels.fp8.wgrad_gemm(a, sa, b, sb), r) < 1e-6
    monkeypatch.undo()
    if not HAS_GPU:
        monkeypatch.setattr(gemm_kernels, "use_tma", lambda arch, fp8_mma, *operands: True)
        with r1kernels.use_backend("triton"):
            assert _rel(r1kernels.fp8.wgrad_gemm(a, sa, b, sb), r) < 1e-6


def _grouped_case(segments, N, K, device):
    ids = []
    for e, n in segments:
        ids += [e] * n + [-1] * (-n % 128)
    ids = torch.tensor(ids, dtype=torch.int32)
    dy, x = torch.randn(len(ids), N), torch.randn(len(ids), K)
    dy[ids < 0] = float("nan")  # padding rows hold garbage; the quantizer must keep it out
    a, sa = r1kernels.fp8.quantize_transposed(dy.to(device), m_indices=ids.to(device))
    b, sb = r1kernels.fp8.quantize_transposed(x.to(device), m_indices=ids.to(device))
    return ids, dy, x, a, sa, b, sb


@pytest.mark.parametrize("amx", ["1", pytest.param("0", id="no-amx")])
@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("segments", [[(1, 100), (3, 300), (0, 128)], [(0, 1), (3, 17)]], ids=["train", "decode"])
def test_grouped_wgrad_per_expert(backend, device, amx, segments, monkeypatch):
    """Experts without tokens (2; also 1 in the decode layout), several segments, and experts whose last real token
    ends a 16-token group or not (the CPU path stops there: the padding past it is zeroed); on the CPU with AMX
    (operands read in place, where the machine has it) and without (views, dequantize + matmul)."""
    if amx == "0" and backend != "cpu":
        pytest.skip("the CPU path's choice")
    monkeypatch.setenv("R1K_CPU_AMX", amx)
    G, N, K = 4, 130, 144
    ids, dy, x, a, sa, b, sb = _grouped_case(segments, N, K, device)
    c = torch.randn(G, N, K, device=device)
    with r1kernels.use_backend(backend):
        d = r1kernels.fp8.grouped_wgrad_gemm(a, sa, b, sb, ids.to(device), G, c=c)
    assert d.shape == (G, N, K)
    d, c = d.cpu(), c.cpu()
    for g in set(range(G)) - {e for e, _ in segments}:
        assert torch.equal(d[g], c[g])
    for g, _ in segments:
        sel = (ids == g).nonzero().squeeze(1)
        lo, hi = int(sel[0]), int(sel[0]) + -(-sel.numel() // 128) * 128
        r = ref.wgrad_gemm(a.cpu()[:, lo:hi], sa.cpu()[:, lo // 128 : hi // 128], b.cpu()[:, lo:hi],
                           sb.cpu()[:, lo // 128 : hi // 128])  # fmt: skip
        assert _rel(d[g] - c[g], r) < 1e-5
        assert ref.calc_diff(d[g] - c[g], dy[sel].T @ x[sel]) < 1e-3


def test_grouped_wgrad_sm80_and_tma_paths(kernel_device, monkeypatch):
    ids, _dy, _x, a, sa, b, sb = _grouped_case([(0, 200), (1, 60)], 70, 144, kernel_device)
    with r1kernels.use_backend("cpu"):
        r = r1kernels.fp8.grouped_wgrad_gemm(a.cpu(), sa.cpu(), b.cpu(), sb.cpu(), ids, 2)
    monkeypatch.setattr(gemm_module, "hw_fp8_convert", lambda arch: False)
    with r1kernels.use_backend("triton"):
        assert _rel(r1kernels.fp8.grouped_wgrad_gemm(a, sa, b, sb, ids.to(kernel_device), 2), r.double()) < 1e-6
    monkeypatch.undo()
    if not HAS_GPU:
        monkeypatch.setattr(gemm_kernels, "use_tma", lambda arch, fp8_mma, *operands: True)
        with r1kernels.use_backend("triton"):
            assert _rel(r1kernels.fp8.grouped_wgrad_gemm(a, sa, b, sb, ids, 2), r.double()) < 1e-6


@pytest.mark.parametrize("layout", [[(1, 100), (3, 300), (0, 128)], [(2, 1)], [(0, 384)], []], ids=str)
def test_token_ranges_cpp_matches_the_device_form(layout):
    """The CPU pass against the torch ops CUDA tensors take: padding segments, absent experts, several segments."""
    ids = torch.full((128,), -1, dtype=torch.int32)  # a padding segment first
    for e, n in layout:
        seg = torch.full((-(-n // 128) * 128,), -1, dtype=torch.int32)
        seg[:n] = e
        ids = torch.cat([ids, seg])
    got = grouped_wgrad_module.token_ranges(ids, 4)
    assert got.dtype == torch.int32 and torch.equal(got, grouped_wgrad_module.token_ranges_torch(ids, 4))
    for e, n in layout:
        rows = (ids == e).nonzero().squeeze(1)
        assert got[e].tolist() == [int(rows[0]), int(rows[0]) + -(-n // 128) * 128]
    assert all(got[e].tolist() == [0, 0] for e in range(4) if e not in dict(layout))
    trimmed = grouped_wgrad_module.token_ranges(ids, 4, real_end=True)  # the CPU GEMM's: up to the last real token
    for e in range(4):
        start, end = got[e].tolist()
        real_end = int((ids == e).nonzero().max()) + 1 if start < end else 0
        want = [start, min(end, -(-real_end // 16) * 16)] if start < end else [0, 0]
        assert trimmed[e].tolist() == want, e


@pytest.mark.parametrize(
    "ids,match",
    [
        ([0] * 128 + [1] * 128 + [0] * 128, "contiguous"),
        ([0] * 64 + [1] * 64 + [1] * 256, "one expert"),
        ([0] * 128 + [5] * 256, r"\[-1, G\)"),
        ([0] * 100, "multiple of 128"),
    ],
)
def test_grouped_wgrad_bad_ids(ids, match):
    ids = torch.tensor(ids, dtype=torch.int32)
    a, sa = r1kernels.fp8.quantize_transposed(torch.randn(384, 32))
    b, sb = r1kernels.fp8.quantize_transposed(torch.randn(384, 48))
    with pytest.raises(ValueError, match=match):
        r1kernels.fp8.grouped_wgrad_gemm(a, sa, b, sb, ids, 2)


@pytest.mark.parametrize(
    "change,match",
    [  # the grouped form's own rules, each broken once (its quick read must say no, the checks name it)
        (lambda t: {**t, "ids": t["ids"].long()}, "m_indices must have dtype"),
        (lambda t: {**t, "ids": torch.stack([t["ids"], t["ids"]], 1)[:, 0]}, "m_indices must be contiguous"),
        (lambda t: {**t, "ids": t["ids"][:128]}, "one expert id per token"),
        (lambda t: {**t, "num_groups": -1}, "num_groups must be a non-negative int"),
        (lambda t: {**t, "num_groups": 2.0}, "num_groups must be a non-negative int"),
        (lambda t: {**t, "c": torch.zeros(2, 32, 48, dtype=torch.float64)}, "c must have dtype"),
        (lambda t: {**t, "a": t["a"][:, :256], "a_scales": t["a_scales"][:, :2]}, "b must be"),
    ],
)
def test_grouped_wgrad_rules_are_checked(change, match):
    ids = torch.tensor([0] * 128 + [1] * 256, dtype=torch.int32)
    a, sa = r1kernels.fp8.quantize_transposed(torch.randn(384, 32), m_indices=ids)
    b, sb = r1kernels.fp8.quantize_transposed(torch.randn(384, 48), m_indices=ids)
    args = change({"a": a, "a_scales": sa, "b": b, "b_scales": sb, "ids": ids, "num_groups": 2, "c": None})
    with pytest.raises((TypeError, ValueError), match=match):
        r1kernels.fp8.grouped_wgrad_gemm(*list(args.values())[:6], c=args["c"])


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t: {**t, "b_scales": t["b_scales"][:1]}, r"b_scales must be \[N, ceil\(K/128\)\]"),
        (lambda t: {**t, "a": t["a"][:, :32]}, "b must be"),
        (lambda t: {**t, "b": t["b"].float()}, "b must have dtype"),
        (lambda t: {**t, "c": torch.zeros(3, 3)}, "c must be"),
    ],
)
def test_wgrad_bad_input(change, match):
    a, sa = r1kernels.fp8.quantize_transposed(torch.randn(40, 32))
    b, sb = r1kernels.fp8.quantize_transposed(torch.randn(40, 48))
    args = change({"a": a, "a_scales": sa, "b": b, "b_scales": sb, "c": None})
    with pytest.raises((TypeError, ValueError), match=match):
        r1kernels.fp8.wgrad_gemm(args.pop("a"), args.pop("a_scales"), args.pop("b"), args.pop("b_scales"), **args)


def test_transposed_bad_input():
    with pytest.raises(TypeError, match="x must have dtype"):
        r1kernels.fp8.quantize_transposed(torch.zeros(4, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="unit stride"):
        r1kernels.fp8.quantize_transposed(torch.randn(32, 4).T)
    with pytest.raises(ValueError, match="m_indices must hold one id per row"):
        r1kernels.fp8.quantize_transposed(torch.randn(4, 16), m_indices=torch.zeros(5, dtype=torch.int32))


@pytest.mark.skipif(HAS_GPU, reason="runs sm_90a's configuration on CPU tensors; on a GPU the arch decides")
def test_sm90a_configuration_in_the_interpreter(monkeypatch):
    """On sm_90a the weight gradient uses a 128 x 64 tile (row scales on both operands) and TMA: run that
    configuration, dense and per expert, through the interpreter."""
    monkeypatch.setattr(r1kernels.backend, "device_arch", lambda device: 90)
    ids, _dy, _x, a, sa, b, sb = _grouped_case([(0, 200), (1, 60)], 130, 144, "cpu")
    with r1kernels.use_backend("triton"):
        dense = r1kernels.fp8.wgrad_gemm(a, sa, b, sb)
        grouped = r1kernels.fp8.grouped_wgrad_gemm(a, sa, b, sb, ids, 2)
    assert _rel(dense, ref.wgrad_gemm(a, sa, b, sb)) < 1e-6
    with r1kernels.use_backend("cpu"):
        assert _rel(grouped, r1kernels.fp8.grouped_wgrad_gemm(a, sa, b, sb, ids, 2).double()) < 1e-6
