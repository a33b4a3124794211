"""FP8 quantization / dequantization: every backend against reference.py, bit for bit."""

import pytest
import torch
from conftest import HAS_GPU, backends_for

import r1kernels
from r1kernels.fp8 import reference as ref
from r1kernels.fp8 import tiles

SHAPES = [(1, 1), (3, 200), (129, 4096), (67, 300), (2, 128), (5, 16), (33, 129)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _rand(shape, dtype, device) -> torch.Tensor:
    # A wide dynamic range across rows exercises subnormal codes and large scales, never zeros.
    x = torch.randn(shape, dtype=torch.float32) * torch.logspace(-3, 3, shape[0])[:, None]
    return x.to(dtype).to(device)


def _assert_same_quant(q, s, rq, rs):
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert torch.equal(s.cpu(), rs), f"scales differ at {(s.cpu() != rs).nonzero()[:5].tolist()}"
    diff = _bits(q.cpu()) != _bits(rq)
    assert not diff.any(), f"{int(diff.sum())} bytes differ, first at {diff.nonzero()[:5].tolist()}"


@pytest.fixture(params=["hw", "software"])
def fp8_convert(request, monkeypatch):
    """Both the hardware conversion (sm_89+, emulated by the interpreter shim) and the software encoder
    that sm_80 runs."""
    if request.param == "software":
        monkeypatch.setattr(tiles, "hw_fp8_convert", lambda arch: False)
    elif HAS_GPU and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("hardware FP8 conversion needs sm_89+")
    return request.param


@pytest.mark.parametrize("backend,device", backends_for(op_has_cuda_kernel=True))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_token_group_matches_reference(backend, device, shape, dtype):
    x = _rand(shape, dtype, device)
    with r1kernels.use_backend(backend):
        q, s = r1kernels.fp8.quantize_per_token_group(x)
    rq, rs = ref.quantize_per_token_group(x.cpu())
    assert s.shape == (shape[0], -(-shape[1] // 128))
    _assert_same_quant(q, s, rq, rs)


@pytest.mark.parametrize("shape", [(3, 200), (129, 4096), (33, 129)], ids=str)
@pytest.mark.parametrize("ue8m0", [False, True])
def test_triton_encoders_match_reference(fp8_convert, kernel_device, shape, ue8m0):
    x = _rand(shape, torch.bfloat16, kernel_device)
    with r1kernels.use_backend("triton"):
        q, s = r1kernels.fp8.quantize_per_token_group(x, ue8m0=ue8m0)
        bq, bs = r1kernels.fp8.quantize_per_block(x, ue8m0=ue8m0)
    _assert_same_quant(q, s, *ref.quantize_per_token_group(x.cpu(), ue8m0=ue8m0))
    _assert_same_quant(bq, bs, *ref.quantize_per_block(x.cpu(), ue8m0=ue8m0))


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("shape", [(1, 1), (3, 200), (129, 4096), (130, 257)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [128, 64])
def test_per_block_matches_reference(backend, device, shape, dtype, block_size):
    w = _rand(shape, dtype, device)
    with r1kernels.use_backend(backend):
        q, s = r1kernels.fp8.quantize_per_block(w, block_size)
    assert s.shape == (-(-shape[0] // block_size), -(-shape[1] // block_size))
    _assert_same_quant(q, s, *ref.quantize_per_block(w.cpu(), block_size))


@pytest.mark.parametrize("backend,device", backends_for(op_has_cuda_kernel=True))
@pytest.mark.parametrize("group_size", [16, 64, 256, 1024])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_group_sizes_and_ue8m0(backend, device, group_size, ue8m0):
    x = _rand((19, 1000), torch.bfloat16, device)
    with r1kernels.use_backend(backend):
        q, s = r1kernels.fp8.quantize_per_token_group(x, group_size, ue8m0=ue8m0)
    _assert_same_quant(q, s, *ref.quantize_per_token_group(x.cpu(), group_size, ue8m0))
    if ue8m0:
        mantissa, _ = torch.frexp(s.cpu())
        assert torch.all(mantissa == 0.5), "UE8M0 scales must be powers of two"


@pytest.mark.parametrize("backend,device", backends_for(op_has_cuda_kernel=True))
@pytest.mark.parametrize("m", [1, 5, 130])
def test_m_major_scale_layout(backend, device, m):
    x = _rand((m, 520), torch.bfloat16, device)
    with r1kernels.use_backend(backend):
        q, s = r1kernels.fp8.quantize_per_token_group(x, scale_layout="m_major")
    aligned_m = -(-m // 4) * 4
    assert s.shape == (m, 5) and s.stride() == (1, aligned_m)
    assert (s.data_ptr() + s.stride(1) * 4) % 16 == 0  # every column starts 16-byte aligned
    _assert_same_quant(q, s.contiguous(), *ref.quantize_per_token_group(x.cpu()))


@pytest.mark.parametrize("backend,device", backends_for(op_has_cuda_kernel=True))
def test_strided_rows(backend, device):
    big = _rand((40, 700), torch.bfloat16, device)
    x = big[:, 100:612]  # row stride 700, unit column stride
    with r1kernels.use_backend(backend):
        q, s = r1kernels.fp8.quantize_per_token_group(x)
        bq, bs = r1kernels.fp8.quantize_per_block(x)
    _assert_same_quant(q, s, *ref.quantize_per_token_group(x.cpu()))
    _assert_same_quant(bq, bs, *ref.quantize_per_block(x.cpu()))


def _e4m3_edge_values() -> torch.Tensor:
    """Every e4m3 value, the midpoints between neighbours (ties to even) and points just off them."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (codes[1:] + codes[:-1]) / 2
    vals = torch.cat([codes, mids, mids * (1 + 2**-20), mids * (1 - 2**-20), torch.tensor([2.0**-10, 2.0**-12])])
    return torch.cat([vals, -vals])


@pytest.mark.parametrize("backend,device", backends_for(op_has_cuda_kernel=True))
def test_rounding_is_nearest_even_on_every_code(backend, device, fp8_convert):
    vals = _e4m3_edge_values()
    # A leading 448 makes the group's scale exactly 1, so the encoder sees the values themselves.
    x = torch.cat([torch.full((vals.numel(), 1), 448.0), vals[:, None].expand(-1, 127)], dim=1)
    x = x.to(device)
    with r1kernels.use_backend(backend):
        q, s = r1kernels.fp8.quantize_per_token_group(x)
    assert torch.all(s.cpu() == 1.0)
    expected = vals.to(torch.float8_e4m3fn)  # torch rounds to nearest even
    assert torch.equal(_bits(q.cpu()[:, 1]), _bits(expected))


@pytest.mark.parametrize("backend,device", backends_for(op_has_cuda_kernel=True))
def test_non_finite_and_zero_groups(backend, device):
    x = torch.randn(4, 256) + 0.5
    x[0, 3] = float("nan")
    x[1, 130] = float("inf")
    x[2, :128] = 0.0  # all-zero group
    x[3, 200] = float("-inf")
    with r1kernels.use_backend(backend):
        q, s = r1kernels.fp8.quantize_per_token_group(x.to(device))
        d = r1kernels.fp8.dequantize_per_token_group(q, s, out_dtype=torch.float32) if backend != "cuda" else None
    q, s = q.cpu(), s.cpu()
    assert torch.isnan(s[0, 0]) and q[0, :128].float().isnan().all()  # NaN propagates to the group
    assert torch.isfinite(s[0, 1]) and not q[0, 128:].float().isnan().any()  # and only that group
    assert s[1, 1] == float("inf") and q[1, 130].float().isnan() and (q[1, 128:130].float() == 0).all()
    assert s[2, 0] == pytest.approx(1e-4 / 448) and (q[2, :128].float() == 0).all()  # no NaN from zeros
    assert s[3, 1] == float("inf")
    if d is not None:
        d = d.cpu()
        assert d[0, :128].isnan().all() and d[1, 128:].isnan().all() and (d[2, :128] == 0).all()
        assert torch.isfinite(d[0, 128:]).all()
    _assert_same_quant(
        q,
        s.where(~s.isnan(), 0),
        *(t if t.dtype != torch.float32 else t.where(~t.isnan(), 0) for t in ref.quantize_per_token_group(x)),
    )


@pytest.mark.parametrize("backend,device", backends_for())
@pytest.mark.parametrize("shape", [(1, 1), (3, 200), (129, 4096), (130, 257)], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dequantize_matches_reference(backend, device, shape, out_dtype):
    x = _rand(shape, torch.float32, device)
    gq, gs = ref.quantize_per_token_group(x.cpu())
    bq, bs = ref.quantize_per_block(x.cpu())
    with r1kernels.use_backend(backend):
        g = r1kernels.fp8.dequantize_per_token_group(gq.to(device), gs.to(device), out_dtype=out_dtype)
        b = r1kernels.fp8.dequantize_per_block(bq.to(device), bs.to(device), out_dtype=out_dtype)
    assert g.dtype == out_dtype and b.dtype == out_dtype
    assert torch.equal(g.cpu(), ref.dequantize_tiles(gq, gs, 1, 128).to(out_dtype))
    assert torch.equal(b.cpu(), ref.dequantize_tiles(bq, bs, 128, 128).to(out_dtype))
    # the round trip is within e4m3's half-ulp (2^-4 relative) plus half a subnormal step of the scale
    g32 = ref.dequantize_tiles(gq, gs, 1, 128)
    bound = x.cpu().abs() * 2**-4 + gs.repeat_interleave(128, 1)[:, : shape[1]] * 2**-10
    assert torch.all((g32 - x.cpu()).abs() <= bound)


@pytest.mark.parametrize("backend,device", backends_for())
def test_dequantize_decodes_every_code(backend, device):
    """All 256 codes (subnormals, both zeros, +-448, the two NaNs) decode bit-exactly to torch's values."""
    codes = torch.arange(256, dtype=torch.uint8).view(2, 128).view(torch.float8_e4m3fn)
    with r1kernels.use_backend(backend):
        d = r1kernels.fp8.dequantize_per_token_group(codes.to(device), torch.ones(2, 1, device=device),
                                                     out_dtype=torch.float32).cpu()  # fmt: skip
    want = codes.float()
    assert torch.equal(d.isnan(), want.isnan()) and want.isnan().sum() == 2
    assert torch.equal(d[~want.isnan()].view(torch.int32), want[~want.isnan()].view(torch.int32))


@pytest.mark.parametrize("backend,device", backends_for())
def test_dequantize_m_major_scales(backend, device):
    x = _rand((37, 300), torch.bfloat16, device)
    with r1kernels.use_backend(backend):
        q, s = r1kernels.fp8.quantize_per_token_group(x, scale_layout="m_major")
        d = r1kernels.fp8.dequantize_per_token_group(q, s, out_dtype=torch.float32)
    assert torch.equal(d.cpu(), ref.dequantize_tiles(q.cpu(), s.cpu(), 1, 128))


def test_empty_inputs():
    for shape in [(0, 256), (4, 0)]:
        q, s = r1kernels.fp8.quantize_per_token_group(torch.randn(shape))
        assert q.shape == shape and s.shape == (shape[0], -(-shape[1] // 128))
        q, s = r1kernels.fp8.quantize_per_block(torch.randn(shape))
        assert q.shape == shape


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: r1kernels.fp8.quantize_per_token_group(torch.randn(4, 8).to(torch.int32)), "x must have dtype"),
        (lambda: r1kernels.fp8.quantize_per_token_group(torch.randn(2, 4, 8)), "x must be 2-D"),
        (lambda: r1kernels.fp8.quantize_per_token_group(torch.randn(8, 4).t()), "unit stride"),
        (lambda: r1kernels.fp8.quantize_per_token_group(torch.randn(4, 8), 100), "group_size must be a power"),
        (lambda: r1kernels.fp8.quantize_per_token_group(torch.randn(4, 8), 2048), "group_size must be a power"),
        (lambda: r1kernels.fp8.quantize_per_token_group(torch.randn(4, 8), scale_layout="col"), "scale_layout"),
        (lambda: r1kernels.fp8.quantize_per_block(torch.randn(4, 8), 96), "block_size must be a power"),
        (lambda: r1kernels.fp8.quantize_per_block("w"), "w must be a torch.Tensor"),
        (lambda: r1kernels.fp8.dequantize_per_token_group(torch.randn(4, 256), torch.ones(4, 2)), "x_fp8 must have"),
        (
            lambda: r1kernels.fp8.dequantize_per_token_group(
                torch.randn(4, 256).to(torch.float8_e4m3fn), torch.ones(4, 3)
            ),
            r"scales must have shape \(4, 2\)",
        ),
        (
            lambda: r1kernels.fp8.dequantize_per_block(
                torch.randn(4, 256).to(torch.float8_e4m3fn), torch.ones(1, 2), out_dtype=torch.float16
            ),
            "out_dtype",
        ),
    ],
)
def test_bad_input_raises_clear_error(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_quantize_does_not_write_on_bad_input():
    x = torch.randn(4, 256)
    with pytest.raises(ValueError):
        r1kernels.fp8.quantize_per_token_group(x, 100)
    assert torch.isfinite(x).all()


def test_torch_compile_fullgraph():
    def roundtrip(x):
        q, s = r1kernels.fp8.quantize_per_token_group(x)
        wq, ws = r1kernels.fp8.quantize_per_block(x, 64, ue8m0=True)
        return r1kernels.fp8.dequantize_per_token_group(
            q, s, out_dtype=torch.float32
        ) + r1kernels.fp8.dequantize_per_block(wq, ws, 64, out_dtype=torch.float32)

    x = _rand((20, 300), torch.bfloat16, "cpu")
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), roundtrip(x))
