#pragma once
// One element of an fp32 / bf16 / fp16 tensor read as fp32, or an fp32 value stored in one (round to nearest
// even, torch's conversions): the CPU kernels' edges to tensors whose dtype is a run-time argument.
#include <cstdint>
#include <cstring>

#include "common/dtype.h"
#include "common/host_device.h"

namespace r1k {

__attribute__((always_inline)) inline float load_float(const void* base, DType dtype, int64_t i) {
  if (dtype == DType::kFloat32) return static_cast<const float*>(base)[i];
  const uint16_t h = static_cast<const uint16_t*>(base)[i];
  return dtype == DType::kBFloat16 ? bf16_to_float(h) : fp16_to_float(h);
}

__attribute__((always_inline)) inline void store_float(void* base, DType dtype, int64_t i, float v) {
  if (dtype == DType::kFloat32) {
    static_cast<float*>(base)[i] = v;
  } else if (dtype == DType::kBFloat16) {
    static_cast<uint16_t*>(base)[i] = float_to_bf16_rne(v);
  } else {
    static_cast<uint16_t*>(base)[i] = float_to_fp16_rne(v);
  }
}

// count elements from element `first` set to +0.0: all-zero bits in each of the dtypes, so one memset (a store per
// element through the dtype switch cost ~1 us per 16K elements, the zero rows of a decode step's padding)
inline void store_zeros(void* base, DType dtype, int64_t first, int64_t count) {
  const int64_t bytes = dtype == DType::kFloat32 ? 4 : 2;
  std::memset(static_cast<char*>(base) + first * bytes, 0, static_cast<size_t>(count * bytes));
}

}  // namespace r1k
