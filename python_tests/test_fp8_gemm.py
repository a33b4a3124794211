"""Block-scaled FP8 GEMM (gemm_nt) against the float64 dequantized reference and, by DeepGEMM's metric,
against an fp32 matmul of the unquantized inputs; every backend, the sm_80 decode path, odd shapes, K not a
multiple of 128, c accumulation, M-major scales, bad input."""

import importlib

import pytest
import torch
from conftest import HAS_GPU, backends_for

import r1kernels
from r1kernels import cpu_caps
from r1kernels._checks import cdiv
from r1kernels._ext import ext
from r1kernels.fp8 import reference as ref

gemm_module = importlib.import_module("r1kernels.fp8.gemm_nt")  # the package re-exports the function's name


def _operands(M, N, K, device, spread=True):
    x = torch.randn(M, K) * (torch.logspace(-2, 2, M)[:, None] if spread else 1.0)
    w = torch.randn(N, K) * K**-0.5
    a, sa = r1kernels.fp8.quantize_per_token_group(x.to(device))
    b, sb = r1kernels.fp8.quantize_per_block(w.to(device))
    return x, w, a, sa, b, sb


def _rel(d, r) -> float:
    assert not torch.isnan(d).any(), "NaN in output"
    return float((d.double().cpu() - r).norm() / r.norm())


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("M,N,K", [(1, 130, 128), (5, 300, 336), (70, 257, 80), (130, 128, 256)], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(backend, device, M, N, K, out_dtype):
    x, w, a, sa, b, sb = _operands(M, N, K, device)
    with r1kernels.use_backend(backend):
        d = r1kernels.fp8.gemm_nt(a, sa, b, sb, out_dtype=out_dtype)
    r = ref.gemm_nt(a.cpu(), sa.cpu(), b.cpu(), sb.cpu())
    assert d.shape == (M, N) and d.dtype == out_dtype
    assert _rel(d, r) < (1e-6 if out_dtype == torch.float32 else 4e-3)
    if K >= 256:  # DeepGEMM's bar against the unquantized product (at tiny K the e4m3 error does not average)
        assert ref.calc_diff(d.cpu(), x @ w.T) < 1e-3


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("N,K", [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)],
                         ids=str)  # fmt: skip
def test_deepseek_v3_shapes(backend, device, N, K):
    """DeepSeek-V3's projection shapes at a decode-sized M. The interpreter runs the first N rows of each
    (every K block, so the whole promotion chain); the CPU path the whole weight."""
    if backend == "triton" and not HAS_GPU:
        N = 256
    x, w, a, sa, b, sb = _operands(2, N, K, device, spread=False)
    with r1kernels.use_backend(backend):
        d = r1kernels.fp8.gemm_nt(a, sa, b, sb, out_dtype=torch.float32)
    assert ref.calc_diff(d.cpu(), x @ w.T) < 1e-3
    assert _rel(d, ref.gemm_nt(a.cpu(), sa.cpu(), b.cpu(), sb.cpu())) < 1e-5  # fp32 sums over up to 128 blocks


def test_sm80_decode_path_matches_reference(kernel_device, monkeypatch):
    """sm_80 has no FP8 MMA: the kernel turns the codes into fp16 (value * 2^-8, exact) and multiplies in fp16."""
    monkeypatch.setattr(gemm_module, "hw_fp8_convert", lambda arch: False)
    _, _, a, sa, b, sb = _operands(70, 257, 208, kernel_device)
    with r1kernels.use_backend("triton"):
        d = r1kernels.fp8.gemm_nt(a, sa, b, sb, out_dtype=torch.float32)
    assert _rel(d, ref.gemm_nt(a.cpu(), sa.cpu(), b.cpu(), sb.cpu())) < 1e-6


@pytest.mark.skipif(HAS_GPU, reason="forces the sm_90a descriptor path on CPU tensors; on a GPU the arch decides")
def test_tma_operand_path_in_the_interpreter(monkeypatch):
    """sm_90a's tensor-descriptor loads (edges zero-filled by TMA instead of masks), run by the interpreter."""
    kernels = importlib.import_module("r1kernels.fp8.kernels.gemm_nt")
    monkeypatch.setattr(kernels, "use_tma", lambda arch, fp8_mma, *operands: True)
    _, _, a, sa, b, sb = _operands(70, 257, 208, "cpu")
    c = torch.randn(70, 257)
    with r1kernels.use_backend("triton"):
        d = r1kernels.fp8.gemm_nt(a, sa, b, sb, out_dtype=torch.float32, c=c)
    assert _rel(d, ref.gemm_nt(a, sa, b, sb, c)) < 1e-6


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_c_is_added_and_left_alone(backend, device, out_dtype):
    _, _, a, sa, b, sb = _operands(9, 140, 144, device)
    c = torch.randn(9, 140, device=device).to(out_dtype)
    c0 = c.clone()
    with r1kernels.use_backend(backend):
        d = r1kernels.fp8.gemm_nt(a, sa, b, sb, out_dtype=out_dtype, c=c)
    assert torch.equal(c, c0)
    r = ref.gemm_nt(a.cpu(), sa.cpu(), b.cpu(), sb.cpu(), c.cpu())
    assert _rel(d, r) < (1e-6 if out_dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("backend,device", backends_for())
def test_m_major_activation_scales(backend, device):
    x = torch.randn(37, 304)
    a, sa = r1kernels.fp8.quantize_per_token_group(x.to(device), scale_layout="m_major")
    b, sb = r1kernels.fp8.quantize_per_block(torch.randn(130, 304).to(device))
    assert sa.stride(0) == 1
    with r1kernels.use_backend(backend):
        d = r1kernels.fp8.gemm_nt(a, sa, b, sb, out_dtype=torch.float32)
    assert _rel(d, ref.gemm_nt(a.cpu(), sa.cpu(), b.cpu(), sb.cpu())) < 1e-6


@pytest.mark.parametrize("backend,device", backends_for())
def test_nan_group_poisons_its_row_only_and_zero_rows_stay_finite(backend, device):
    x = torch.randn(4, 256)
    x[1, 5] = float("nan")
    x[2] = 0.0  # all-zero groups: scale 1e-4 / 448, never 0 / 0
    a, sa = r1kernels.fp8.quantize_per_token_group(x.to(device))
    b, sb = r1kernels.fp8.quantize_per_block(torch.randn(130, 256).to(device))
    with r1kernels.use_backend(backend):
        d = r1kernels.fp8.gemm_nt(a, sa, b, sb, out_dtype=torch.float32).cpu()
    assert torch.isnan(d[1]).all() and torch.isfinite(d[[0, 2, 3]]).all() and torch.equal(d[2], torch.zeros(130))


def test_empty_m():
    _, _, a, sa, b, sb = _operands(0, 130, 128, "cpu")
    assert r1kernels.fp8.gemm_nt(a, sa, b, sb).shape == (0, 130)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t: {**t, "a": t["a"].float()}, "a must have dtype"),
        (lambda t: {**t, "a": t["a"][:, :120], "a_scales": t["a_scales"]}, "b must be"),
        (lambda t: {**t, "b_scales": t["b_scales"][:1]}, r"b_scales must be \[ceil\(N/128\), ceil\(K/128\)\]"),
        (lambda t: {**t, "a_scales": t["a_scales"][:, :1]}, r"a_scales must be \[M, ceil\(K/128\)\]"),
        (lambda t: {**t, "out_dtype": torch.float16}, "out_dtype must be"),
        (lambda t: {**t, "c": torch.zeros(3, 3)}, "c must be"),
    ],
)
def test_bad_input(change, match):
    _, _, a, sa, b, sb = _operands(5, 130, 256, "cpu")
    args = change({"a": a, "a_scales": sa, "b": b, "b_scales": sb, "out_dtype": torch.bfloat16, "c": None})
    with pytest.raises((TypeError, ValueError), match=match):
        r1kernels.fp8.gemm_nt(args.pop("a"), args.pop("a_scales"), args.pop("b"), args.pop("b_scales"), **args)


def _padded_rows(t):  # same values, row stride 160: a multiple of 16
    return torch.cat([t, t[:, :16]], 1)[:, : t.shape[1]]


_RULE_BREAKS = [  # each rule of validate_matrices broken once, on operands that pass all the others
    ("a", lambda t: t.view(torch.uint8), "a must have dtype"),
    ("a_scales", lambda t: t[None], "a_scales must be 2-D"),
    ("b", lambda t: t[:, :128], "b must be"),
    ("a", lambda t: torch.cat([t, t], 1)[:, ::2], "a must be row-major"),
    ("a", lambda t: torch.cat([t, t[:, :8]], 1)[:, :144], "a must be row-major"),  # row stride 152
    ("b", lambda t: torch.cat([t, t[:, :8]], 1)[:, :144], "b must be row-major"),
    ("a_scales", lambda t: t[:-1], r"a_scales must be \[M, ceil"),
    ("b_scales", lambda t: torch.cat([t, t], 1), r"b_scales must be \[ceil"),
    ("out_dtype", lambda t: torch.float16, "out_dtype must be"),
]


@pytest.mark.parametrize("operand,change,match", _RULE_BREAKS, ids=[m for _, _, m in _RULE_BREAKS])
def test_fast_validation_accepts_nothing_the_checks_reject(operand, change, match):
    """``read_operands`` (one pass, the usual case) must refuse whatever the named checks reject: else a bad
    input would pass unnamed. Each case: it says no and the op raises the named error."""
    _, _, a, sa, b, sb = _operands(5, 130, 144, "cpu")
    args = {"a": _padded_rows(a), "a_scales": sa, "b": _padded_rows(b), "b_scales": sb, "out_dtype": torch.bfloat16}
    assert gemm_module.read_operands(*args.values(), 2, 2) is not None  # strided rows are fine
    args[operand] = change(args[operand])
    assert gemm_module.read_operands(*args.values(), 2, 2) is None
    with pytest.raises((TypeError, ValueError), match=match):
        r1kernels.fp8.gemm_nt(*list(args.values())[:4], out_dtype=args["out_dtype"])


def test_k_must_be_a_multiple_of_16():
    a = torch.zeros(2, 40).to(torch.float8_e4m3fn)
    b = torch.zeros(3, 40).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="K must be a multiple of 16"):
        r1kernels.fp8.gemm_nt(a, torch.ones(2, 1), b, torch.ones(1, 1))


@pytest.mark.parametrize("hot_offset", [0, 16], ids=["lanes-0-15", "lanes-16-31"])
def test_few_row_cpu_path_decodes_every_code_in_every_lane(hot_offset):
    """The few-row CPU GEMM decodes b's codes in runs of 16 (AVX-512 where present): row i of a is one-hot at
    column i + hot_offset, so out[i, j] is b[j]'s code in that column, decoded. Every non-NaN code visits every
    lane; a NaN code poisons only its own row of b."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)  # the 254 numbers
    n = codes.numel()
    b = codes[(torch.arange(n)[:, None] + torch.arange(32)[None, :]) % n].view(torch.float8_e4m3fn)
    a = torch.zeros(16, 32)
    a[torch.arange(16), torch.arange(16) + hot_offset] = 1.0
    a = a.to(torch.float8_e4m3fn)
    b[7, 30] = torch.tensor(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)  # NaN in b's row 7
    with r1kernels.use_backend("cpu"):
        out = r1kernels.fp8.gemm_nt(a, torch.ones(16, 1), b, torch.ones(2, 1), out_dtype=torch.float32)
    want = b.float()[:, torch.arange(16) + hot_offset].T  # [16, n]
    assert torch.isnan(out[:, 7]).all()
    keep = [j for j in range(n) if j != 7]
    assert torch.equal(out[:, keep], want[:, keep])


class _CountingExt:
    """ext() with its AMX FP8 GEMM calls counted."""

    def __init__(self):
        self.amx_calls = 0

    def __getattr__(self, name):
        return getattr(ext(), name)

    def fp8_gemm_amx_cpu(self, *args, **kw):
        self.amx_calls += 1
        return ext().fp8_gemm_amx_cpu(*args, **kw)


@pytest.mark.parametrize("amx", ["1", "0"], ids=["amx", "dequantize"])
@pytest.mark.parametrize("M,N,K,b_tile_rows", [(45, 200, 300, 128), (33, 70, 1100, 128), (130, 257, 256, 1),
                                           (1040, 1030, 200, 128)],
                         ids=str)  # fmt: skip
def test_cpu_many_row_forms(amx, M, N, K, b_tile_rows, monkeypatch):
    """Above the few-row threshold the CPU multiplies on AMX tiles where it has them (codes exact in bf16, sums
    fp32 per 128-wide K block, then scaled), else dequantizes to fp32 for a matmul: both against float64 at
    shapes off every tile edge, weight-block and row scales (the weight gradient's), strided scales, c added into
    a bf16 out, a NaN code reaching exactly its row and column, and which form ran."""
    monkeypatch.setenv("R1K_CPU_AMX", amx)
    counting = _CountingExt()
    monkeypatch.setattr(gemm_module, "ext", lambda: counting)
    x, w = torch.randn(M, K) * torch.logspace(-2, 2, M)[:, None], torch.randn(N, K)
    x[7, 3] = float("nan")
    nan_col = 11 if b_tile_rows == 1 or N > 128 else None  # in a 128-row weight block: its scale, all 128 columns
    if nan_col is not None:
        w[nan_col, K - 1] = float("nan")
    a, sa = r1kernels.fp8.quantize_per_token_group(x)
    sa = sa.T.contiguous().T  # M-major scales (DeepGEMM's sfa layout): a column stride of 1
    if b_tile_rows == 1:
        b, sb = r1kernels.fp8.quantize_per_token_group(w)
        r = ref.wgrad_gemm(a, sa, b, sb)
    else:
        b, sb = r1kernels.fp8.quantize_per_block(w)
        r = ref.gemm_nt(a, sa, b, sb)
    c = torch.randn(M, N)
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
    gemm_module.cpu_gemm(a, sa, b, sb, out, c, b_tile_rows)
    assert (counting.amx_calls > 0) == (amx == "1" and cpu_caps.amx_bf16())
    nan = torch.zeros(M, N, dtype=torch.bool)
    nan[7] = True
    if nan_col is not None:
        nan[:, nan_col if b_tile_rows == 1 else slice(0, 128)] = True
    assert torch.equal(torch.isnan(out), nan)
    assert _rel(out[~nan].float(), (r + c.double())[~nan]) < 4e-3  # bf16 out
    out32 = torch.full((M, N), float("nan"))
    gemm_module.cpu_gemm(a, sa, b, sb, out32, None, b_tile_rows)
    assert _rel(out32[~nan], r[~nan]) < 1e-6


@pytest.mark.skipif(not cpu_caps.amx_bf16(), reason="this CPU / OS has no usable AMX-BF16")
@pytest.mark.parametrize("k", [256, 272], ids=["whole-vectors", "masked-tail"])
def test_cpu_amx_decodes_every_e4m3_code_exactly(k):
    """Each of the 256 codes (subnormals, zeros, both NaNs) through the AMX GEMM's vector decode: a[m] holds
    code m alone, b is the identity in 1.0 codes, so out[m, m] is the code's value exactly (the product and the
    sums of zeros are exact), against torch's own e4m3fn decode; a NaN code's row is NaN throughout."""
    codes = torch.arange(256, dtype=torch.uint8)
    a = torch.zeros(256, k, dtype=torch.uint8)
    a[codes.long(), codes.long()] = codes
    b = torch.zeros(256, k, dtype=torch.uint8)
    b[codes.long(), codes.long()] = 0x38  # 1.0
    a, b = a.view(torch.float8_e4m3fn), b.view(torch.float8_e4m3fn)
    sa, sb = torch.ones(256, cdiv(k, 128)), torch.ones(256, cdiv(k, 128))
    out = torch.full((256, 256), -7.0)
    gemm_module._cpu_gemm_amx(a, sa, b, sb, out, None, 1)
    want = codes.view(torch.float8_e4m3fn).float()
    nan = torch.isnan(want)
    assert nan.sum() == 2 and torch.isnan(out[nan]).all()
    assert torch.equal(out.diagonal()[~nan], want[~nan])
