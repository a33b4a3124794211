"""FP8 (E4M3) on the DeepSeek-V3 recipe: quantization in 1 x 128 activation groups and 128 x 128 weight blocks,
and the block-scaled GEMM over them."""

from r1kernels.fp8.dequantize import dequantize_per_block, dequantize_per_token_group
from r1kernels.fp8.gemm_nt import gemm_nt
from r1kernels.fp8.grouped_gemm_nt import grouped_gemm_nt_contiguous
from r1kernels.fp8.masked_grouped_gemm_nt import grouped_gemm_nt_masked
from r1kernels.fp8.quantize_per_block import quantize_per_block
from r1kernels.fp8.quantize_per_token_group import quantize_per_token_group

__all__ = [
    "dequantize_per_block",
    "dequantize_per_token_group",
    "gemm_nt",
    "grouped_gemm_nt_contiguous",
    "grouped_gemm_nt_masked",
    "quantize_per_block",
    "quantize_per_token_group",
]
