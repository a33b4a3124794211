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

}  // namespace r1k
