#pragma once
// Vector building blocks of the CPU kernels. The build targets baseline x86-64 (SSE2); functions marked
// R1K_VECTOR_CLONES are also compiled for AVX2 and AVX-512 and the loader picks one per CPU (GCC ifunc). Worth
// it only for long loops: a cloned call is not inlined (a cloned 128-long dot per weight row made the few-row
// GEMMs 1.4-2.3x slower than the inlined baseline one).
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define R1K_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define R1K_VECTOR_CLONES
#endif

namespace r1k {

// x . y summed in eight fixed lanes, then pairwise: vectorizable, and the same order (the same result) on
// every CPU and every run.
inline float dot8(const float* x, const float* y, int64_t n) {
  float part[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) part[l] += x[i + l] * y[i + l];
  for (; i < n; ++i) part[i % 8] += x[i] * y[i];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

}  // namespace r1k
