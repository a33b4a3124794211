// Few-row MoE expert linear on the CPU (see grouped_linear_small.h).
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/cpu_vector.h"
#include "common/host_device.h"
#include "moe/grouped_linear_small.h"

namespace r1k {
namespace {

constexpr int64_t kRows = 16;               // rows per pass over an expert's weight
constexpr int64_t kParallelWork = 1 << 18;  // multiply-adds below which the calling thread works alone

void to_float(const void* base, DType dtype, int64_t offset, int64_t n, float* out) {
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

void store(void* base, DType dtype, int64_t i, float v) {
  if (dtype == DType::kFloat32) {
    static_cast<float*>(base)[i] = v;
  } else if (dtype == DType::kBFloat16) {
    static_cast<uint16_t*>(base)[i] = float_to_bf16_rne(v);
  } else {
    static_cast<uint16_t*>(base)[i] = float_to_fp16_rne(v);
  }
}

}  // namespace

void grouped_linear_small_cpu(const void* x, const void* weight, const int32_t* row_expert, void* out, DType dtype,
                              const GroupedLinearProblem& p) {
  const int64_t N = p.n, K = p.k;
  std::vector<float> rows_f32(static_cast<size_t>(kRows * K)), w_serial(static_cast<size_t>(K));
  for (int64_t m0 = 0; m0 < p.rows;) {
    const int32_t e = row_expert[m0];
    int64_t m1 = m0 + 1;
    while (m1 < std::min(p.rows, m0 + kRows) && row_expert[m1] == e) ++m1;
    const int64_t rows = m1 - m0;
    if (e < 0) {  // padding rows
      for (int64_t i = m0 * N; i < m1 * N; ++i) store(out, dtype, i, 0.0f);
      m0 = m1;
      continue;
    }
    to_float(x, dtype, m0 * K, rows * K, rows_f32.data());
    auto column = [&](int64_t j, float* w) {  // output column j of these rows: one row of the expert's weight
      to_float(weight, dtype, (e * N + j) * K, K, w);
      for (int64_t i = 0; i < rows; ++i) store(out, dtype, (m0 + i) * N + j, dot8(rows_f32.data() + i * K, w, K));
    };
    // A parallel region costs its set-up even when its if() clause keeps it on one thread: decode-sized
    // experts (one row each, a few dozen per call) run without one.
    if (rows * N * K >= kParallelWork) {
#pragma omp parallel
      {
        std::vector<float> w(static_cast<size_t>(K));
#pragma omp for schedule(static)
        for (int64_t j = 0; j < N; ++j) column(j, w.data());
      }
    } else {
      for (int64_t j = 0; j < N; ++j) column(j, w_serial.data());
    }
    m0 = m1;
  }
}

}  // namespace r1k
