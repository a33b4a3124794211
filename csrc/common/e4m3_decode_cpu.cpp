#include "common/e4m3_decode_cpu.h"

#include <cmath>

#include "common/cpu_isa.h"
#include "common/e4m3.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// GCC 12's AVX-512 intrinsics self-initialise their "undefined" operands, which -Wmaybe-uninitialized reports
// at every use
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "common/e4m3_avx2.h"
#define R1K_X86 1
#endif

namespace r1k {
namespace {

void decode_table(const uint8_t* codes, int64_t n, float* out) {
  const float* table = e4m3_table();
  for (int64_t i = 0; i < n; ++i) out[i] = table[codes[i]];
}

#if defined(R1K_X86)
// e4m3 (bias 7, 3 mantissa bits) placed in fp16's fields (bias 15) is the same number times 2^-8, subnormals
// included (they become fp16 subnormals); times 256 restores it exactly. Only 0x7F / 0xFF are NaN in e4m3fn.
__attribute__((target("avx512f,avx512bw"))) void decode_avx512(const uint8_t* codes, int64_t n, float* out) {
  const __m512i magnitude = _mm512_set1_epi32(0x7F), sign = _mm512_set1_epi32(0x80);
  const __m512 rebias = _mm512_set1_ps(256.0f), nan = _mm512_set1_ps(std::nanf(""));
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
    const __m512i mag = _mm512_and_si512(c, magnitude);
    const __m512i half = _mm512_or_si512(_mm512_slli_epi32(mag, 7), _mm512_slli_epi32(_mm512_and_si512(c, sign), 8));
    __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(half)), rebias);
    v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(mag, magnitude), nan);
    _mm512_storeu_ps(out + i, v);
  }
  decode_table(codes + i, n - i, out + i);
}

__attribute__((target("avx2,f16c"))) void decode_avx2(const uint8_t* codes, int64_t n, float* out) {
  int64_t i = 0;
  for (__m256 lo, hi; i + 16 <= n; i += 16) {
    e4m3_decode16_avx2(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)), &lo, &hi);
    _mm256_storeu_ps(out + i, lo);
    _mm256_storeu_ps(out + i + 8, hi);
  }
  decode_table(codes + i, n - i, out + i);
}
#endif

using Decode = void (*)(const uint8_t*, int64_t, float*);

Decode pick() {
#if defined(R1K_X86)
  if (cpu_isa() == CpuIsa::kAvx512) return decode_avx512;
  if (cpu_isa() == CpuIsa::kAvx2) return decode_avx2;
#endif
  return decode_table;
}

}  // namespace

void e4m3_decode_run(const uint8_t* codes, int64_t n, float* out) {
  static const Decode decode = pick();
  decode(codes, n, out);
}

}  // namespace r1k
