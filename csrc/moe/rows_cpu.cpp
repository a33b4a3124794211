// MoE row movement on the CPU (see rows.h). Rows are converted to fp32 through a small per-row buffer so the
// inner loops are plain float loops that the compiler vectorizes; OpenMP spreads rows or tokens over threads
// only when there is enough work to pay for waking the team (decode-sized calls stay on the calling thread).
#include "moe/rows.h"

#include <cstring>
#include <vector>

#include "common/host_device.h"

namespace r1k {
namespace {

constexpr int64_t kParallelElements = 1 << 15;

void load_row(const void* base, DType dtype, int64_t offset, int64_t n, float* out) {
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

void store_row(const float* row, int64_t n, DType dtype, void* base, int64_t offset) {
  if (dtype == DType::kFloat32) {
    std::memcpy(static_cast<float*>(base) + offset, row, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  uint16_t* p = static_cast<uint16_t*>(base) + offset;
  if (dtype == DType::kBFloat16) {
    for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16_rne(row[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] = float_to_fp16_rne(row[i]);
  }
}

}  // namespace

void gather_rows_cpu(const void* x, const int32_t* slots, const float* weights, void* out, const RowsProblem& p,
                     DType dtype, int64_t elem_bytes) {
  const int64_t H = p.hidden;
  const char* src = static_cast<const char*>(x);
  char* dst = static_cast<char*>(out);
#pragma omp parallel if (p.rows * H >= kParallelElements)
  {
    std::vector<float> row(weights != nullptr ? static_cast<size_t>(H) : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.rows; ++r) {
      const int32_t s = slots[r];
      char* o = dst + r * H * elem_bytes;
      if (s < 0) {
        std::memset(o, 0, static_cast<size_t>(H * elem_bytes));
      } else if (weights == nullptr) {
        std::memcpy(o, src + (s / p.top_k) * p.row_stride * elem_bytes, static_cast<size_t>(H * elem_bytes));
      } else {
        load_row(x, dtype, (s / p.top_k) * p.row_stride, H, row.data());
        const float w = weights[s];
        for (int64_t i = 0; i < H; ++i) row[i] *= w;
        store_row(row.data(), H, dtype, out, r * H);
      }
    }
  }
}

void combine_rows_cpu(const void* y, const int32_t* row_of, const float* weights, void* out, const RowsProblem& p,
                      DType dtype) {
  const int64_t H = p.hidden, k = p.top_k;
#pragma omp parallel if (p.tokens * k * H >= kParallelElements)
  {
    std::vector<float> acc(static_cast<size_t>(H)), row(static_cast<size_t>(H));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int32_t r = row_of[t * k + j];
        if (r < 0) continue;
        load_row(y, dtype, r * p.row_stride, H, row.data());
        const float w = weights != nullptr ? weights[t * k + j] : 1.0f;
        for (int64_t i = 0; i < H; ++i) acc[i] += w * row[i];
      }
      store_row(acc.data(), H, dtype, out, t * H);
    }
  }
}

void row_dot_cpu(const void* d, DType d_dtype, const void* y, DType y_dtype, const int32_t* row_of, float* out,
                 const RowsProblem& p) {
  const int64_t H = p.hidden, k = p.top_k;
#pragma omp parallel if (p.tokens * k * H >= kParallelElements)
  {
    std::vector<float> drow(static_cast<size_t>(H)), yrow(static_cast<size_t>(H));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) {
      load_row(d, d_dtype, t * H, H, drow.data());
      for (int64_t j = 0; j < k; ++j) {
        const int32_t r = row_of[t * k + j];
        if (r < 0) {
          out[t * k + j] = 0.0f;
          continue;
        }
        load_row(y, y_dtype, r * p.row_stride, H, yrow.data());
        float part[8] = {};  // eight fixed lanes: vectorizable, and the same order on every run
        int64_t i = 0;
        for (; i + 8 <= H; i += 8)
          for (int l = 0; l < 8; ++l) part[l] += drow[i + l] * yrow[i + l];
        for (; i < H; ++i) part[i % 8] += drow[i] * yrow[i];
        float dot = 0.0f;
        for (float v : part) dot += v;
        out[t * k + j] = dot;
      }
    }
  }
}

}  // namespace r1k
