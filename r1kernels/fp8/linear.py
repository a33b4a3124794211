"""FP8 linear layer on DeepSeek-V3's recipe: fprop, dgrad and wgrad all block-scaled FP8 GEMMs.

    fprop  y  = x @ W.T      x 1 x 128 (row-wise),         W 128 x 128 blocks
    dgrad  dx = dy @ W       dy 1 x 128 (row-wise),        W.T 128 x 128 blocks (W's codes transposed)
    wgrad  dW = dy.T @ x     dy.T and x.T 1 x 128 along tokens (128 x 1 tiles), fp32 out

A 128 x 128 block's scale does not care which way the block is read, so W.T's quantization is W's codes
transposed with the scale grid transposed: the weight is quantized once per step. Activation gradients are
never quantized in 128 x 128 blocks (the recipe's finding: that diverges). The forward keeps x.T in FP8 for
the weight gradient instead of x itself (half the saved bytes of bf16).
"""

from __future__ import annotations

import torch
from torch import nn

from r1kernels._checks import check_tensor
from r1kernels.fp8 import reference as fp8_reference
from r1kernels.fp8.gemm_nt import gemm_nt
from r1kernels.fp8.quantize_per_block import quantize_per_block
from r1kernels.fp8.quantize_per_token_group import quantize_per_token_group
from r1kernels.fp8.quantize_transposed import quantize_rowwise_and_transposed
from r1kernels.fp8.wgrad_gemm import wgrad_gemm
from r1kernels.reference_mode import use_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FEATURE_ALIGN = 16  # in and out features are each a GEMM's K in one of the three products: 16-byte e4m3 rows


class QuantizedWeight:
    """A weight's 128 x 128 block quantization and, made on first use (the backward), its transpose."""

    __slots__ = ("_codes_t", "codes", "scales")

    def __init__(self, weight: torch.Tensor):
        self.codes, self.scales = quantize_per_block(weight.detach())
        self._codes_t = None

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._codes_t is None:
            self._codes_t = self.codes.t().contiguous()
        return self._codes_t, self.scales.t()


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32  # fp16 out via fp32


def validate(x, weight, bias) -> None:
    check_tensor("x", x, dtypes=DTYPES)
    check_tensor("weight", weight, dtypes=DTYPES, ndim=2)
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must be [..., in_features] with in_features = weight.shape[1] = {K}, got {tuple(x.shape)}")
    if K % FEATURE_ALIGN or N % FEATURE_ALIGN:
        raise ValueError(f"in_features and out_features must be multiples of {FEATURE_ALIGN} (16-byte FP8 rows in "
                         f"the three GEMMs), got weight [out, in] = {(N, K)}")  # fmt: skip
    tensors = {"weight": weight}
    if bias is not None:
        check_tensor("bias", bias, dtypes=DTYPES, ndim=1)
        if bias.shape[0] != N:
            raise ValueError(f"bias must be [out_features] = [{N}], got {tuple(bias.shape)}")
        tensors["bias"] = bias
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, qweight):
        out_dtype = _gemm_dtype(x2.dtype)
        if weight.requires_grad:  # the weight gradient will want x.T: quantize both from one read of x
            xq, xs, xtq, xts = quantize_rowwise_and_transposed(x2)
        else:
            (xq, xs), xtq, xts = quantize_per_token_group(x2), None, None
        c = None if bias is None else bias.detach().to(out_dtype).expand(x2.shape[0], -1)
        y = gemm_nt(xq, xs, qweight.codes, qweight.scales, out_dtype=out_dtype, c=c)
        ctx.save_for_backward(xtq, xts)
        ctx.qweight = qweight
        ctx.dtypes = (x2.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.to(x2.dtype)

    @staticmethod
    def backward(ctx, dy):
        xtq, xts = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        dy = dy.contiguous()
        dx = dw = db = None
        if need_w:
            dyq, dys, dytq, dyts = quantize_rowwise_and_transposed(dy)
            dw = wgrad_gemm(dytq, dyts, xtq, xts).to(w_dtype)
        elif need_x:
            dyq, dys = quantize_per_token_group(dy)
        if need_x:
            codes_t, scales_t = ctx.qweight.transposed()
            dx = gemm_nt(dyq, dys, codes_t, scales_t, out_dtype=_gemm_dtype(x_dtype)).to(x_dtype)
        if need_b:
            db = dy.sum(0, dtype=torch.float32).to(b_dtype)
        return dx, dw, db, None


def _apply(x, weight, bias, qweight) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = _FP8LinearFunction.apply(x2, weight, bias, qweight)
    return y.view(*x.shape[:-1], weight.shape[0])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ weight.T + bias`` with all three GEMMs (forward, input gradient, weight gradient) in FP8.

    Args:
        x: ``[..., in_features]`` float32 / bfloat16 / float16, any leading shape.
        weight: ``[out_features, in_features]`` float32 / bfloat16 / float16 (the master weight); quantized
            here in 128 x 128 blocks, once per call (forward and backward share it). Both feature counts must
            be multiples of 16.
        bias: optional ``[out_features]``, added in the GEMM's epilogue (in the output dtype).

    Returns ``[..., out_features]`` in x's dtype. Gradients: x's in x's dtype, weight's and bias's in theirs
    (the weight gradient is an fp32 GEMM result). x's activations are kept for the backward as FP8 x.T.
    """
    validate(x, weight, bias)
    return _apply(x, weight, bias, QuantizedWeight(weight))


class FP8Linear(nn.Linear):
    """Drop-in ``nn.Linear`` whose forward and backward GEMMs run in FP8 (see ``fp8_linear``).

    ``weight`` (and ``bias``) stay the ordinary master parameters in the given dtype, so optimizers,
    state dicts and ``nn.Linear`` checkpoints work unchanged. The weight's FP8 quantization is cached and
    reused across calls until the weight changes (an optimizer step, ``load_state_dict``, any in-place edit:
    tracked by the tensor's version counter and storage). ``in_features`` and ``out_features`` must be
    multiples of 16.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        if in_features % FEATURE_ALIGN or out_features % FEATURE_ALIGN:
            raise ValueError(f"in_features and out_features must be multiples of {FEATURE_ALIGN}, got "
                             f"({in_features}, {out_features})")  # fmt: skip
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._qweight: QuantizedWeight | None = None
        self._qweight_key: tuple | None = None

    def quantized_weight(self) -> QuantizedWeight:
        w = self.weight
        if torch.compiler.is_compiling():  # a traced graph must not hold Python-side state
            return QuantizedWeight(w)
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if key != self._qweight_key:
            self._qweight, self._qweight_key = QuantizedWeight(w), key
        return self._qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        validate(x, self.weight, self.bias)
        if use_reference():  # the float64 recipe on the same tiles, for whole-model validation
            return fp8_reference.fp8_linear(x, self.weight, self.bias).to(x.dtype)
        return _apply(x, self.weight, self.bias, self.quantized_weight())

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fp8=e4m3 (1x128 activations, 128x128 weights)"


def to_fp8_linear(linear: nn.Linear) -> bool:
    """Make a plain ``nn.Linear`` an ``FP8Linear`` in place (the same parameters, names and hooks: its state
    dict does not change). Returns False, leaving it as it is, when its feature counts are not multiples of 16
    or it is a subclass of ``nn.Linear`` with its own forward."""
    if isinstance(linear, FP8Linear):
        return True
    if type(linear) is not nn.Linear or linear.in_features % FEATURE_ALIGN or linear.out_features % FEATURE_ALIGN:
        return False
    # FP8Linear's own state (the cache of the quantized weight) comes from a meta-device instance, so this stays
    # right whatever state FP8Linear keeps
    template = FP8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    linear.__class__ = FP8Linear
    for key, value in vars(template).items():
        linear.__dict__.setdefault(key, value)
    return True
