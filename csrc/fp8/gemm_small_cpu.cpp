// Few-row FP8 GEMM on the CPU (see gemm_small.h). Up to kRows rows of a are decoded once to fp32; each
// 128-code block of a b row is decoded once into a small buffer and dotted with every one of those rows, so
// b's codes are read and decoded once per row block and nothing of b's size is ever written.
#include <algorithm>
#include <vector>

#include "common/cpu_vector.h"
#include "common/e4m3.h"
#include "common/e4m3_decode_cpu.h"
#include "fp8/gemm_small.h"

namespace r1k {
namespace {

constexpr int64_t kBlock = 128;  // K per scale
constexpr int64_t kRows = 16;    // rows of a per pass over b
constexpr int64_t kParallelWork = 1 << 18;  // multiply-adds below which the calling thread works alone

float load(const void* base, DType dtype, int64_t i) {
  return dtype == DType::kFloat32 ? static_cast<const float*>(base)[i]
                                  : bf16_to_float(static_cast<const uint16_t*>(base)[i]);
}

void store(void* base, DType dtype, int64_t i, float v) {
  if (dtype == DType::kFloat32) {
    static_cast<float*>(base)[i] = v;
  } else {
    static_cast<uint16_t*>(base)[i] = float_to_bf16_rne(v);
  }
}

void zero_rows(void* out, DType dtype, int64_t base, int64_t first, int64_t end, int64_t n, int64_t stride) {
  for (int64_t r = first; r < end; ++r)
    for (int64_t j = 0; j < n; ++j) store(out, dtype, base + r * stride + j, 0.0f);
}

}  // namespace

bool fp8_gemm_small_cpu(const uint8_t* a, const float* sa, const uint8_t* b, const float* sb, const void* c,
                        DType c_dtype, void* out, DType out_dtype, const int32_t* row_expert, const int32_t* masked_m,
                        const Fp8GemmProblem& p) {
  const int64_t M = p.m, N = p.n, K = p.k, kblocks = (K + kBlock - 1) / kBlock;
  if (masked_m != nullptr) {  // checked here, for the price of a loop, instead of four torch ops on the host
    for (int64_t g = 0; g < p.groups; ++g)
      if (masked_m[g] < 0 || masked_m[g] > M) return false;
  }
  std::vector<float> rows_f32(static_cast<size_t>(kRows * K));
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t live = masked_m != nullptr ? masked_m[g] : M;
    const int64_t out_g = g * p.out_stride_g;
    zero_rows(out, out_dtype, out_g, live, M, N, p.out_stride_m);
    for (int64_t m0 = 0; m0 < live;) {
      // a block of rows that share one expert (always, without row_expert)
      const int64_t e = row_expert != nullptr ? row_expert[m0] : g;
      int64_t m1 = m0 + 1;
      while (m1 < std::min(live, m0 + kRows) && (row_expert == nullptr || row_expert[m1] == e)) ++m1;
      const int64_t rows = m1 - m0;
      if (e < 0) {  // padding rows
        zero_rows(out, out_dtype, out_g, m0, m1, N, p.out_stride_m);
        m0 = m1;
        continue;
      }
      for (int64_t i = 0; i < rows; ++i)
        e4m3_decode_run(a + g * p.a_stride_g + (m0 + i) * p.a_stride_m, K, rows_f32.data() + i * K);
      const uint8_t* b_e = b + e * p.b_stride_g;
      const float* sb_e = sb + e * p.sb_stride_g;
      const float* sa_g = sa + g * p.sa_stride_g;
#pragma omp parallel for schedule(static) if (rows * N * K >= kParallelWork)
      for (int64_t j = 0; j < N; ++j) {
        float acc[kRows] = {};
        float codes[kBlock];
        const uint8_t* brow = b_e + j * p.b_stride_n;
        const float* sb_row = sb_e + (j / p.b_tile_rows) * p.sb_stride_n;
        for (int64_t kb = 0; kb < kblocks; ++kb) {
          const int64_t k0 = kb * kBlock, len = std::min(kBlock, K - k0);
          e4m3_decode_run(brow + k0, len, codes);
          const float scale_b = sb_row[kb * p.sb_stride_k];
          for (int64_t i = 0; i < rows; ++i)
            acc[i] += dot8(rows_f32.data() + i * K + k0, codes, len) *
                      (sa_g[(m0 + i) * p.sa_stride_m + kb * p.sa_stride_k] * scale_b);
        }
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t m = m0 + i;
          const float bias = c != nullptr ? load(c, c_dtype, m * p.c_stride_m + j) : 0.0f;
          store(out, out_dtype, out_g + m * p.out_stride_m + j, acc[i] + bias);
        }
      }
      m0 = m1;
    }
  }
  return true;
}

}  // namespace r1k
