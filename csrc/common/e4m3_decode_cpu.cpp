#include "common/e4m3_decode_cpu.h"

#include "common/cpu_isa.h"
#include "common/e4m3.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// GCC 12's AVX-512 intrinsics self-initialise their "undefined" operands, which -Wmaybe-uninitialized reports
// at every use
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "common/e4m3_avx2.h"
#include "common/e4m3_avx512.h"
#define R1K_X86 1
#endif

namespace r1k {
namespace {

void decode_table(const uint8_t* codes, int64_t n, float* out) {
  const float* table = e4m3_table();
  for (int64_t i = 0; i < n; ++i) out[i] = table[codes[i]];
}

#if defined(R1K_X86)
__attribute__((target("avx512f,avx512bw"))) void decode_avx512(const uint8_t* codes, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, e4m3_decode16_avx512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i))));
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
