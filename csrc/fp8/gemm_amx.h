#pragma once
// Block-scaled FP8 GEMM on Intel AMX tiles (CPU). Every e4m3 code is exactly a bf16 value, so the codes go
// through AMX's bf16 products unchanged: each product is exact and the tile sums it in fp32. Per 128-wide K
// block the partial sums are scaled by sa * sb and added into fp32 (DeepSeek-V3's promotion, as the GPU kernels
// and the few-row CPU path do). Replaces dequantize-to-fp32 + fp32 matmul where the CPU has AMX-BF16.
#include <cstdint>

#include "fp8/gemm_small.h"

namespace r1k {

// out [m, n] (out_dtype, row stride p.out_stride_m) = (a * sa) @ (b * sb).T (+ c [m, n], c_dtype, row stride
// p.c_stride_m; null for none) for a [m, k] / b [n, k] e4m3 codes (row strides p.a_stride_m / p.b_stride_n),
// sa [m, ceil(k/128)], sb [ceil(n / p.b_tile_rows), ceil(k/128)] fp32 (p's scale strides); the fp32 sum (+ c) is
// rounded once into out. p.groups must be 1. Only when amx_bf16_usable(); OpenMP over output blocks.
void fp8_gemm_amx_cpu(const uint8_t* a, const float* sa, const uint8_t* b, const float* sb, const void* c,
                      DType c_dtype, void* out, DType out_dtype, const Fp8GemmProblem& p);

}  // namespace r1k
