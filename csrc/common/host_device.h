#pragma once
// Per-element logic shared by a CUDA kernel and its CPU twin is written once with R1K_HD, so the CPU
// tests cover the arithmetic the GPU runs.
#if defined(__CUDACC__)
#define R1K_HD __host__ __device__ __forceinline__
#else
#define R1K_HD inline
#endif

#include <cstdint>
#include <cstring>

namespace r1k {

R1K_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
#endif
}

R1K_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
#endif
}

R1K_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// IEEE binary16 -> binary32, exact (subnormals included).
R1K_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return bits_float(sign | 0x7F800000u | (mant << 13));
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  // subnormal: mant * 2^-24, exact in float
  const float mag = static_cast<float>(mant) * 5.9604644775390625e-08f;
  return bits_float(sign | float_bits(mag));
}

// binary32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN.
R1K_HD uint16_t float_to_bf16_rne(float v) {
  const uint32_t b = float_bits(v);
  if (v != v) return static_cast<uint16_t>((b >> 16) | 0x40u);
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// binary32 -> IEEE binary16, round to nearest even (torch's `.half()`): overflow to inf, subnormals exact.
R1K_HD uint16_t float_to_fp16_rne(float v) {
  const uint32_t b = float_bits(v);
  const uint32_t sign = (b >> 16) & 0x8000u, mag = b & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);  // NaN
  if (mag >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds past 65504
  if (mag < 0x38800000u) {  // below 2^-14: a multiple of 2^-24; the scaled value is exact, so one rounding
    const float units = bits_float(mag) * 16777216.0f;
    const float whole = static_cast<float>(static_cast<int32_t>(units));
    const float frac = units - whole;
    uint32_t q = static_cast<uint32_t>(whole);
    if (frac > 0.5f || (frac == 0.5f && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);  // q == 1024 is the smallest normal's encoding
  }
  const uint32_t rounded = mag + 0xFFFu + ((mag >> 13) & 1u);  // to nearest even at the 13th bit
  return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

}  // namespace r1k
