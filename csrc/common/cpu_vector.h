#pragma once
// Vector building blocks of the CPU kernels. The build targets baseline x86-64 (SSE2); functions marked
// R1K_VECTOR_CLONES are also compiled for AVX2 and AVX-512 and the loader picks one per CPU (GCC ifunc). Worth
// it only for long loops: a cloned call is not inlined (a cloned 128-long dot per weight row made the few-row
// GEMMs 1.4-2.3x slower than the inlined baseline one).
#include <cstdint>

#include "common/host_device.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define R1K_X86_AVX2 1  // the AVX2 forms below can be built (they run where common/cpu_isa.h says so)
#endif

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

// Eight fp32 lanes in GCC's generic vector type: plain arithmetic that each form compiles for its own registers
// (two SSE registers in the baseline form, one ymm register where compiled with target("avx2")), so code written
// with it can be inlined into functions of either target and gives the same bits in both.
typedef float Lanes8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline Lanes8 load_lanes8(const float* p) {
  Lanes8 v;
  __builtin_memcpy(&v, p, sizeof v);  // unaligned
  return v;
}

__attribute__((always_inline)) inline void store_lanes8(float* p, const Lanes8& v) { __builtin_memcpy(p, &v, sizeof v); }

// dot8's final pairwise sum of the eight lanes.
__attribute__((always_inline)) inline float sum_lanes8(const Lanes8& v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// dot8(x, y[c], n) for c < 4 in one pass over x, in generic vectors: four independent chains of adds where one dot
// is a chain of n / 8 dependent adds; dot8's lanes and order, the same four results, in either form.
__attribute__((always_inline)) inline void dot8_rows4(const float* x, const float* const y[4], int64_t n,
                                                      float out[4]) {
  Lanes8 p0 = {}, p1 = {}, p2 = {}, p3 = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const Lanes8 xi = load_lanes8(x + i);
    p0 += xi * load_lanes8(y[0] + i);
    p1 += xi * load_lanes8(y[1] + i);
    p2 += xi * load_lanes8(y[2] + i);
    p3 += xi * load_lanes8(y[3] + i);
  }
  for (; i < n; ++i) {  // dot8's tail: element i adds to lane i % 8
    p0[i % 8] += x[i] * y[0][i];
    p1[i % 8] += x[i] * y[1][i];
    p2[i % 8] += x[i] * y[2][i];
    p3[i % 8] += x[i] * y[3][i];
  }
  out[0] = sum_lanes8(p0), out[1] = sum_lanes8(p1), out[2] = sum_lanes8(p2), out[3] = sum_lanes8(p3);
}

#if defined(R1K_X86_AVX2)
// The element types dot8x4 reads y in, each converted to fp32 exactly: fp32, bf16 (bits shifted into place),
// fp16 (the F16C converter), so a caller need not convert a weight row into a buffer first.
enum class Elem { kF32, kBF16, kF16 };

template <Elem E>
__attribute__((target("avx2,f16c"), always_inline)) inline __m256 load8(const void* p, int64_t i) {
  if constexpr (E == Elem::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    if constexpr (E == Elem::kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
  }
}

template <Elem E>
__attribute__((always_inline)) inline float load1(const void* p, int64_t i) {
  if constexpr (E == Elem::kF32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return E == Elem::kBF16 ? bf16_to_float(h) : fp16_to_float(h);
}

// dot8(x, y[c], n) for c < 4 in one pass over x: four independent chains of vector adds (one dot is a chain of
// n / 8 dependent adds, bound by their latency), each with dot8's lanes and order: the same four results. For
// functions compiled with target("avx2,f16c"), without FMA to contract the products into.
template <Elem E = Elem::kF32>
__attribute__((target("avx2,f16c"), always_inline)) inline __m128 dot8x4(const float* x, const void* const y[4],
                                                                          int64_t n) {
  __m256 p[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xi = _mm256_loadu_ps(x + i);
    for (int c = 0; c < 4; ++c) p[c] = _mm256_add_ps(p[c], _mm256_mul_ps(xi, load8<E>(y[c], i)));
  }
  if (i < n) {  // dot8's tail: element i adds to lane i % 8
    alignas(32) float part[4][8];
    for (int c = 0; c < 4; ++c) _mm256_store_ps(part[c], p[c]);
    for (; i < n; ++i)
      for (int c = 0; c < 4; ++c) part[c][i % 8] += x[i] * load1<E>(y[c], i);
    for (int c = 0; c < 4; ++c) p[c] = _mm256_load_ps(part[c]);
  }
  // lane c of the two halves: ((l0 + l1) + (l2 + l3)) and ((l4 + l5) + (l6 + l7)) of p[c], then their sum
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(p[0], p[1]), _mm256_hadd_ps(p[2], p[3]));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#endif

}  // namespace r1k
