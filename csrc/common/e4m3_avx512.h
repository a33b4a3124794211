#pragma once
// 16 e4m3 codes -> 16 fp32 on AVX-512 (F + BW), for functions compiled with a target that includes both: as in
// e4m3_avx2.h, an e4m3 code's fields placed in fp16's (bias 15 instead of 7, subnormals included) are the same
// number times 2^-8, so the fp16 converter and one multiply by 256 decode it exactly; 0x7F / 0xFF (e4m3fn's only
// NaNs) become NaN. ~8 instructions per 16 codes.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cmath>

namespace r1k {

__attribute__((target("avx512f,avx512bw"), always_inline)) inline __m512 e4m3_decode16_avx512(__m128i codes) {
  const __m512i magnitude = _mm512_set1_epi32(0x7F);
  const __m512i c = _mm512_cvtepu8_epi32(codes);
  const __m512i mag = _mm512_and_si512(c, magnitude);
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(c, _mm512_set1_epi32(0x80)), 8);
  const __m512i half = _mm512_or_si512(_mm512_slli_epi32(mag, 7), sign);
  const __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(half)), _mm512_set1_ps(256.0f));
  return _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(mag, magnitude), _mm512_set1_ps(std::nanf("")));
}

}  // namespace r1k
#endif
