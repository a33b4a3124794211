// Few-row MoE expert linear on the CPU (see grouped_linear_small.h). Where the CPU has AVX2
// (common/cpu_isa.h) four weight rows are dotted at a time, read in place and converted in registers (dot8x4:
// independent addition chains, dot8's lanes and order, so the same bits as the baseline form's one dot8 per
// weight row converted into a buffer).
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/cpu_isa.h"
#include "common/cpu_vector.h"
#include "common/dtype_io.h"
#include "common/host_device.h"
#include "moe/grouped_linear_small.h"

namespace r1k {
namespace {

constexpr int64_t kRows = 16;               // rows per pass over an expert's weight
constexpr int64_t kParallelWork = 1 << 18;  // multiply-adds below which the calling thread works alone

__attribute__((always_inline)) inline void to_float(const void* base, DType dtype, int64_t offset, int64_t n,
                                                     float* out) {
  if (dtype == DType::kFloat32) {
    std::memcpy(out, static_cast<const float*>(base) + offset, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
  if (dtype == DType::kBFloat16) {
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(p[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_float(p[i]);
  }
}

// Output columns j0 .. j0 + cols (cols <= 4) of `rows` rows (fp32 in x32) under expert e's weight; w: 4 x k floats.
using Columns = void (*)(const void* weight, DType dtype, int64_t e, const GroupedLinearProblem& p, const float* x32,
                         int64_t m0, int64_t rows, int64_t j0, int64_t cols, void* out, float* w);

void columns_baseline(const void* weight, DType dtype, int64_t e, const GroupedLinearProblem& p, const float* x32,
                      int64_t m0, int64_t rows, int64_t j0, int64_t cols, void* out, float* w) {
  for (int64_t j = j0; j < j0 + cols; ++j) {
    to_float(weight, dtype, (e * p.n + j) * p.k, p.k, w);
    for (int64_t i = 0; i < rows; ++i) store_float(out, dtype, (m0 + i) * p.n + j, dot8(x32 + i * p.k, w, p.k));
  }
}

#if defined(R1K_X86_AVX2)
// the weight rows read in place, converted in registers (no buffer): w unused
template <Elem E>
__attribute__((target("avx2,f16c"), always_inline)) inline void columns_avx2(const void* weight, int64_t e,
                                                                             const GroupedLinearProblem& p,
                                                                             const float* x32, int64_t m0,
                                                                             int64_t rows, int64_t j0, int64_t cols,
                                                                             void* out, DType dtype) {
  const size_t elt = E == Elem::kF32 ? 4 : 2;
  const void* y[4];
  for (int64_t c = 0; c < 4; ++c)  // past cols: the last column again, its result not stored
    y[c] = static_cast<const char*>(weight) + ((e * p.n + j0 + std::min(c, cols - 1)) * p.k) * elt;
  for (int64_t i = 0; i < rows; ++i) {
    alignas(16) float dots[4];
    _mm_store_ps(dots, dot8x4<E>(x32 + i * p.k, y, p.k));
    for (int64_t c = 0; c < cols; ++c) store_float(out, dtype, (m0 + i) * p.n + j0 + c, dots[c]);
  }
}

__attribute__((target("avx2,f16c"))) void columns_avx2(const void* weight, DType dtype, int64_t e,
                                                       const GroupedLinearProblem& p, const float* x32, int64_t m0,
                                                       int64_t rows, int64_t j0, int64_t cols, void* out, float*) {
  if (dtype == DType::kFloat32) {
    columns_avx2<Elem::kF32>(weight, e, p, x32, m0, rows, j0, cols, out, dtype);
  } else if (dtype == DType::kBFloat16) {
    columns_avx2<Elem::kBF16>(weight, e, p, x32, m0, rows, j0, cols, out, dtype);
  } else {
    columns_avx2<Elem::kF16>(weight, e, p, x32, m0, rows, j0, cols, out, dtype);
  }
}
#endif

Columns pick_columns() {
#if defined(R1K_X86_AVX2)
  if (cpu_isa() >= CpuIsa::kAvx2) return columns_avx2;
#endif
  return columns_baseline;
}

}  // namespace

void grouped_linear_small_cpu(const void* x, const void* weight, const int32_t* row_expert, void* out, DType dtype,
                              const GroupedLinearProblem& p) {
  const int64_t N = p.n, K = p.k;
  const Columns columns = pick_columns();
  std::vector<float> rows_f32(static_cast<size_t>(kRows * K)), w_serial(static_cast<size_t>(4 * K));
  for (int64_t m0 = 0; m0 < p.rows;) {
    const int32_t e = row_expert[m0];
    int64_t m1 = m0 + 1;
    while (m1 < std::min(p.rows, m0 + kRows) && row_expert[m1] == e) ++m1;
    const int64_t rows = m1 - m0;
    if (e < 0) {  // padding rows
      store_zeros(out, dtype, m0 * N, rows * N);
      m0 = m1;
      continue;
    }
    to_float(x, dtype, m0 * K, rows * K, rows_f32.data());
    auto step = [&](int64_t j0, float* w) {  // output columns j0 .. j0 + 3: four rows of the expert's weight
      columns(weight, dtype, e, p, rows_f32.data(), m0, rows, j0, std::min<int64_t>(4, N - j0), out, w);
    };
    // A parallel region costs its set-up even when its if() clause keeps it on one thread: decode-sized
    // experts (one row each, a few dozen per call) run without one.
    if (rows * N * K >= kParallelWork) {
#pragma omp parallel
      {
        std::vector<float> w(static_cast<size_t>(4 * K));
#pragma omp for schedule(static)
        for (int64_t j0 = 0; j0 < N; j0 += 4) step(j0, w.data());
      }
    } else {
      for (int64_t j0 = 0; j0 < N; j0 += 4) step(j0, w_serial.data());
    }
    m0 = m1;
  }
}

}  // namespace r1k
