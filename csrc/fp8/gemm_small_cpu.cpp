// Few-row FP8 GEMM on the CPU (see gemm_small.h). Up to kRows rows of a are decoded once to fp32; each
// 128-code block of a b row is decoded once into a small buffer and dotted with every one of those rows, so
// b's codes are read and decoded once per row block and nothing of b's size is ever written.
//
// Where the CPU has AVX2 (common/cpu_isa.h) the b rows go kCols at a time through one AVX2 function: their
// dots with a row of a run as independent addition chains (dot8x4: one 128-long dot is a chain of 16 dependent
// vector adds, bound by their latency), with dot8's lanes and order, so both forms give the same bits; the
// decode goes through the fp16 converter.
#include <algorithm>
#include <vector>

#include "common/cpu_isa.h"
#include "common/cpu_vector.h"
#include "common/dtype_io.h"
#include "common/e4m3.h"
#include "common/e4m3_decode_cpu.h"
#include "fp8/gemm_small.h"

#if defined(R1K_X86_AVX2)
#include "common/e4m3_avx2.h"
#endif

namespace r1k {
namespace {

constexpr int64_t kBlock = 128;  // K per scale
constexpr int64_t kRows = 16;    // rows of a per pass over b
constexpr int64_t kCols = 4;     // rows of b per step
constexpr int64_t kParallelWork = 1 << 18;  // multiply-adds below which the calling thread works alone

void zero_rows(void* out, DType dtype, int64_t base, int64_t first, int64_t end, int64_t n, int64_t stride) {
  if (stride == n) return store_zeros(out, dtype, base + first * stride, (end - first) * n);  // one dense run
  for (int64_t r = first; r < end; ++r) store_zeros(out, dtype, base + r * stride, n);
}

// One row block of a (decoded) against b: what a step over kCols rows of b reads.
struct Operands {
  const float* a32;  // [rows, k] fp32, dense
  int64_t rows, k;
  const float* sa;  // the block's first row's scales
  int64_t sa_stride_m, sa_stride_k;
  const uint8_t* b;  // the expert's codes
  int64_t b_stride_n, b_tile_rows;
  const float* sb;
  int64_t sb_stride_n, sb_stride_k;
};

// acc[i * kCols + c] = sum over K blocks of (a row i . b row j0 + c) * sa[i, kb] * sb[j0 + c, kb], c < cols.
void columns_baseline(const Operands& o, int64_t j0, int64_t cols, float* acc) {
  float codes[kBlock];
  std::fill(acc, acc + o.rows * kCols, 0.0f);
  for (int64_t c = 0; c < cols; ++c) {
    const uint8_t* brow = o.b + (j0 + c) * o.b_stride_n;
    const float* sb_row = o.sb + ((j0 + c) / o.b_tile_rows) * o.sb_stride_n;
    for (int64_t k0 = 0, kb = 0; k0 < o.k; k0 += kBlock, ++kb) {
      const int64_t len = std::min(kBlock, o.k - k0);
      e4m3_decode_run(brow + k0, len, codes);
      const float scale_b = sb_row[kb * o.sb_stride_k];
      for (int64_t i = 0; i < o.rows; ++i)
        acc[i * kCols + c] += dot8(o.a32 + i * o.k + k0, codes, len) *
                              (o.sa[i * o.sa_stride_m + kb * o.sa_stride_k] * scale_b);
    }
  }
}

#if defined(R1K_X86_AVX2)
__attribute__((target("avx2,f16c"))) void columns_avx2(const Operands& o, int64_t j0, int64_t cols, float* acc) {
  alignas(32) float codes[kCols][kBlock];
  const uint8_t* brow[kCols];
  const float* sb_row[kCols];
  for (int64_t c = 0; c < kCols; ++c) {  // past cols: the last column again, its result not stored
    const int64_t j = j0 + std::min(c, cols - 1);
    brow[c] = o.b + j * o.b_stride_n;
    sb_row[c] = o.sb + (j / o.b_tile_rows) * o.sb_stride_n;
  }
  std::fill(acc, acc + o.rows * kCols, 0.0f);
  for (int64_t k0 = 0, kb = 0; k0 < o.k; k0 += kBlock, ++kb) {
    const int64_t len = std::min(kBlock, o.k - k0);  // a multiple of 16 (pick_columns)
    const __m128 sb = _mm_setr_ps(sb_row[0][kb * o.sb_stride_k], sb_row[1][kb * o.sb_stride_k],
                                  sb_row[2][kb * o.sb_stride_k], sb_row[3][kb * o.sb_stride_k]);
    for (int64_t c = 0; c < kCols; ++c) {
      for (int64_t k = 0; k < len; k += 16) {
        __m256 lo, hi;
        e4m3_decode16_avx2(_mm_loadu_si128(reinterpret_cast<const __m128i*>(brow[c] + k0 + k)), &lo, &hi);
        _mm256_store_ps(codes[c] + k, lo);
        _mm256_store_ps(codes[c] + k + 8, hi);
      }
    }
    const void* const y[kCols] = {codes[0], codes[1], codes[2], codes[3]};
    for (int64_t i = 0; i < o.rows; ++i) {
      const __m128 dots = dot8x4(o.a32 + i * o.k + k0, y, len);
      const __m128 scale = _mm_mul_ps(_mm_set1_ps(o.sa[i * o.sa_stride_m + kb * o.sa_stride_k]), sb);
      _mm_storeu_ps(acc + i * kCols, _mm_add_ps(_mm_loadu_ps(acc + i * kCols), _mm_mul_ps(dots, scale)));
    }
  }
}
#endif

using Columns = void (*)(const Operands&, int64_t, int64_t, float*);

Columns pick_columns(int64_t k) {
#if defined(R1K_X86_AVX2)
  if (cpu_isa() >= CpuIsa::kAvx2 && k % 16 == 0) return columns_avx2;
#endif
  return columns_baseline;
}

}  // namespace

bool fp8_gemm_small_cpu(const uint8_t* a, const float* sa, const uint8_t* b, const float* sb, const void* c,
                        DType c_dtype, void* out, DType out_dtype, const int32_t* row_expert, const int32_t* masked_m,
                        const Fp8GemmProblem& p) {
  const int64_t M = p.m, N = p.n, K = p.k;
  const Columns columns = pick_columns(K);
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
      if (e < 0) {  // a run of padding rows, however long
        while (m1 < live && row_expert[m1] < 0) ++m1;
        zero_rows(out, out_dtype, out_g, m0, m1, N, p.out_stride_m);
        m0 = m1;
        continue;
      }
      while (m1 < std::min(live, m0 + kRows) && (row_expert == nullptr || row_expert[m1] == e)) ++m1;
      const int64_t rows = m1 - m0;
      for (int64_t i = 0; i < rows; ++i)
        e4m3_decode_run(a + g * p.a_stride_g + (m0 + i) * p.a_stride_m, K, rows_f32.data() + i * K);
      const float* sa_g = sa + g * p.sa_stride_g;
      const Operands o{rows_f32.data(), rows, K, sa_g + m0 * p.sa_stride_m, p.sa_stride_m, p.sa_stride_k,
                       b + e * p.b_stride_g, p.b_stride_n, p.b_tile_rows, sb + e * p.sb_stride_g, p.sb_stride_n,
                       p.sb_stride_k};
#pragma omp parallel for schedule(static) if (rows * N * K >= kParallelWork)
      for (int64_t j0 = 0; j0 < N; j0 += kCols) {
        float acc[kRows * kCols];
        const int64_t cols = std::min(kCols, N - j0);
        columns(o, j0, cols, acc);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t m = m0 + i;
          for (int64_t col = 0; col < cols; ++col) {
            const float bias = c != nullptr ? load_float(c, c_dtype, m * p.c_stride_m + j0 + col) : 0.0f;
            store_float(out, out_dtype, out_g + m * p.out_stride_m + j0 + col, acc[i * kCols + col] + bias);
          }
        }
      }
      m0 = m1;
    }
  }
  return true;
}

}  // namespace r1k
