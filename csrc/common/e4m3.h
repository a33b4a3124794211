#pragma once
// FP8 E4M3 ("fn": no infinities, one NaN pattern per sign, max 448) encode/decode and the
// DeepSeek-V3 scale rule, shared by the CPU kernels and the CUDA kernels.
#include "common/host_device.h"

namespace r1k {

constexpr float kE4M3Max = 448.0f;
constexpr float kMinAmax = 1e-4f;  // DeepSeek-V3: scale = max(amax, 1e-4) / 448, so an all-zero tile gives no NaN

// Round-to-nearest-even float -> e4m3fn byte. Magnitudes above 448 saturate to 448 (as the hardware
// cvt.rn.satfinite does); NaN maps to NaN. Branch-free so CPU loops vectorize. Mirrors
// r1kernels/fp8/kernels.py:_e4m3_bits_software bit for bit.
R1K_HD uint8_t e4m3_encode(float v) {
  const uint32_t bits = float_bits(v);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const float abs_v = bits_float(bits & 0x7FFFFFFFu);
  const float a = abs_v < kE4M3Max ? abs_v : kE4M3Max;  // NaN compares false -> 448, fixed below
  // below 2^-6 the code is a / 2^-9 rounded to nearest even; adding and removing 2^23 does exactly that
  const uint32_t sub = static_cast<uint32_t>((a * 512.0f + 8388608.0f) - 8388608.0f);
  const uint32_t ab = float_bits(a);
  const uint32_t normal = ((ab + 0x7FFFFu + ((ab >> 20) & 1u)) >> 20) - ((127u - 7u) << 3);  // RNE, rebias
  uint32_t code = a < 0.015625f ? sub : normal;
  code = v != v ? 0x7Fu : code;
  return static_cast<uint8_t>(sign | code);
}

R1K_HD float e4m3_decode(uint8_t q) {
  // every case computed, one chosen by selects: no branches, so CPU loops over codes vectorize
  const uint32_t sign = static_cast<uint32_t>(q & 0x80u) << 24;
  const uint32_t exp = (q >> 3) & 0xFu;
  const uint32_t mant = q & 0x7u;
  const uint32_t normal = sign | ((exp + 120u) << 23) | (mant << 20);
  const uint32_t subnormal = sign | float_bits(static_cast<float>(mant) * 0.001953125f);  // mant * 2^-9, exact
  const uint32_t finite = exp == 0 ? subnormal : normal;
  return bits_float((q & 0x7Fu) == 0x7Fu ? (sign | 0x7FC00000u) : finite);
}

#if !defined(__CUDA_ARCH__)
// The 256 decoded codes, for CPU loops: one table load per code is cheaper than the decode's arithmetic
// without wide vectors (the build targets baseline x86-64).
struct E4M3Table {
  float value[256];
  E4M3Table() {
    for (int q = 0; q < 256; ++q) value[q] = e4m3_decode(static_cast<uint8_t>(q));
  }
};
inline const float* e4m3_table() {
  static const E4M3Table table;
  return table.value;
}
#endif

// |x| maximum that propagates NaN: a NaN anywhere makes the tile's scale NaN (documented behaviour).
R1K_HD float nan_max(float acc, float v) {
  const float a = v < 0 ? -v : v;
  if (acc != acc || a != a) return acc != acc ? acc : a;
  return a > acc ? a : acc;
}

// Power-of-two scales (UE8M0) round the scale UP to the next power of two, so |x / scale| <= 448 still.
R1K_HD float round_up_pow2(float s) {
  const uint32_t b = float_bits(s);
  if ((b & 0x7F800000u) == 0x7F800000u) return s;  // inf / nan stay
  return bits_float((b + 0x7FFFFFu) & 0xFF800000u);
}

R1K_HD float tile_scale(float amax, bool pow2) {
  const float s = (amax > kMinAmax ? amax : (amax != amax ? amax : kMinAmax)) / kE4M3Max;
  return pow2 ? round_up_pow2(s) : s;
}

}  // namespace r1k
