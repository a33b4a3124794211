#pragma once
// Block-scaled FP8 GEMM on the CPU for few rows (decode-sized calls): D = (a * sa) @ (b * sb).T straight
// from the codes, without the fp32 copies of the dequantize-then-matmul path. Each 128-wide K block's
// product of codes is summed in fp32 and scaled into an fp32 sum (DeepSeek-V3's promotion, as on the GPU).
#include <cstdint>

#include "common/dtype.h"

namespace r1k {

struct Fp8GemmProblem {
  int64_t groups, m, n, k;  // `groups` independent [m, k] x [n, k] products (the masked layout), else 1
  int64_t b_tile_rows;      // rows of b per scale: 128 (weight blocks) or 1 (row scales, the weight gradient)
  // strides in elements; _g between groups (for b and sb: between experts)
  int64_t a_stride_g, a_stride_m, b_stride_g, b_stride_n;
  int64_t sa_stride_g, sa_stride_m, sa_stride_k, sb_stride_g, sb_stride_n, sb_stride_k;
  int64_t c_stride_m, out_stride_g, out_stride_m;  // out and c have unit column stride
};

// out[g, m, :] = (a[g, m] * sa) @ (b[e] * sb).T (+ c[m, :]) with e = row_expert[m] when row_expert is given (the
// contiguous grouped layout; e < 0: a zero row), else e = g. With masked_m, rows m >= masked_m[g] are zero.
// c (c_dtype) and out (out_dtype): float32 or bfloat16; c may be null. Returns false, with nothing written, when a
// masked_m entry lies outside [0, m].
bool fp8_gemm_small_cpu(const uint8_t* a, const float* sa, const uint8_t* b, const float* sb, const void* c,
                        DType c_dtype, void* out, DType out_dtype, const int32_t* row_expert, const int32_t* masked_m,
                        const Fp8GemmProblem& p);

}  // namespace r1k
