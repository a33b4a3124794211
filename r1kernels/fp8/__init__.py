"""FP8 (E4M3) on the DeepSeek-V3 recipe: quantization in 1 x 128 activation groups and 128 x 128 weight blocks,
and the block-scaled GEMM over them."""

from r1kernels.fp8.dequantize import dequantize_per_block, dequantize_per_token_group
from r1kernels.fp8.gemm_nt import gemm_nt
from r1kernels.fp8.grouped_gemm_nt import grouped_gemm_nt_contiguous
from r1kernels.fp8.grouped_wgrad_gemm import grouped_wgrad_gemm
from r1kernels.fp8.linear import FP8Linear, fp8_linear
from r1kernels.fp8.masked_grouped_gemm_nt import grouped_gemm_nt_masked
from r1kernels.fp8.quantize_per_block import quantize_per_block
from r1kernels.fp8.quantize_per_token_group import quantize_per_token_group
from r1kernels.fp8.quantize_transposed import quantize_rowwise_and_transposed, quantize_transposed
from r1kernels.fp8.wgrad_gemm import wgrad_gemm

__all__ = [
    "FP8Linear",
    "dequantize_per_block",
    "dequantize_per_token_group",
    "fp8_linear",
    "gemm_nt",
    "grouped_gemm_nt_contiguous",
    "grouped_gemm_nt_masked",
    "grouped_wgrad_gemm",
    "quantize_per_block",
    "quantize_per_token_group",
    "quantize_rowwise_and_transposed",
    "quantize_transposed",
    "wgrad_gemm",
]
