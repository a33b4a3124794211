// bf16 -> fp32 GEMM on AMX tiles. Both operands are packed so that every tile load reads 1 KiB of contiguous
// memory: loading tiles straight from row-major matrices (rows 2-8 KiB apart) ran at 300 GFLOP/s per core,
// packed b at 510, packed a and b at 730 (Sapphire Rapids class VM, m 64, n 2048, k 1024).
#include "common/amx_bf16_gemm.h"

#include <algorithm>
#include <cstring>
#include <memory>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define R1K_AMX 1
#endif

#if defined(R1K_AMX)
#include "common/amx_tiles.h"
#endif

namespace r1k {
namespace {

constexpr int64_t kRows = 16;  // rows of a tile (common/amx_tiles.h's)
constexpr int64_t kK = 32;     // bf16 values per tile row (64 bytes)
constexpr int64_t kBlock = 32; // c is computed in 32 x 32 blocks: 2 x 2 accumulator tiles
constexpr int64_t kChunkBlocks = 4;

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

}  // namespace

int64_t amx_packed_b_words(int64_t n, int64_t k) { return round_up(n, kBlock) * round_up(k, kK) / 2; }

void amx_pack_b_nt(const uint16_t* b, int64_t ldb, int64_t n, int64_t k, uint32_t* packed) {
  const int64_t pairs = round_up(k, kK) / 2, panels = round_up(n, kBlock) / kRows;
#pragma omp parallel for schedule(static) if (n * k >= (1 << 16))
  for (int64_t p = 0; p < panels; ++p) {
    uint32_t* panel = packed + p * pairs * kRows;
    for (int64_t j = 0; j < kRows; ++j) {
      const int64_t col = p * kRows + j;
      for (int64_t i = 0; i < pairs; ++i) {
        uint32_t lo = 0, hi = 0;
        if (col < n && 2 * i < k) lo = b[col * ldb + 2 * i];
        if (col < n && 2 * i + 1 < k) hi = b[col * ldb + 2 * i + 1];
        panel[i * kRows + j] = lo | (hi << 16);
      }
    }
  }
}

#if defined(R1K_AMX)

namespace {

// a [m, k] as [m/16][k/32] tiles of 16 x 32 values, each tile 1 KiB contiguous; zeros past m and k.
void pack_a(const uint16_t* a, int64_t lda, int64_t m, int64_t k, uint16_t* packed) {
  const int64_t mp = round_up(m, kBlock), k_tiles = round_up(k, kK) / kK;
#pragma omp for schedule(static)
  for (int64_t r = 0; r < mp; ++r) {
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      uint16_t* dst = packed + ((r / kRows * k_tiles + kt) * kRows + r % kRows) * kK;
      const int64_t k0 = kt * kK, valid = r < m ? std::max<int64_t>(0, std::min(kK, k - k0)) : 0;
      if (valid) std::memcpy(dst, a + r * lda + k0, valid * sizeof(uint16_t));
      std::fill(dst + valid, dst + kK, uint16_t{0});
    }
  }
}

__attribute__((target("amx-tile,amx-bf16"))) void gemm_blocks(const uint16_t* packed_a, int64_t m,
                                                                const uint32_t* packed_b, int64_t n, int64_t k,
                                                                const float* bias, float alpha, float* c,
                                                                int64_t ldc) {
  amx::load_tile_config();
  const int64_t k_tiles = round_up(k, kK) / kK, pairs = k_tiles * kK / 2;
  const int64_t m_blocks = round_up(m, kBlock) / kBlock, n_blocks = round_up(n, kBlock) / kBlock;
  alignas(64) float out[kBlock * kBlock];
  for (int64_t mc = 0; mc < m_blocks; mc += kChunkBlocks) {
#pragma omp for schedule(static)
  for (int64_t nb = 0; nb < n_blocks; ++nb) {
    const uint32_t* b0 = packed_b + (2 * nb) * pairs * kRows;  // this block's two 16-column panels
    const uint32_t* b1 = b0 + pairs * kRows;
    for (int64_t mb = mc; mb < std::min(m_blocks, mc + kChunkBlocks); ++mb) {
      const uint16_t* a0 = packed_a + (2 * mb) * k_tiles * kRows * kK;  // its two 16-row tile rows
      const uint16_t* a1 = a0 + k_tiles * kRows * kK;
      amx::block_2x2(a0, a1, b0, b1, 0, k_tiles, out);
      // the epilogue writes only the rows and columns that exist
      const int64_t r0 = mb * kBlock, c0 = nb * kBlock;
      const int64_t rows = std::min(kBlock, m - r0), cols = std::min(kBlock, n - c0);
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = c + (r0 + r) * ldc + c0;
        const float* src = out + r * kBlock;
        if (bias != nullptr) {
          for (int64_t j = 0; j < cols; ++j) dst[j] = alpha * (src[j] + bias[c0 + j]);
        } else {
          for (int64_t j = 0; j < cols; ++j) dst[j] = alpha * src[j];
        }
      }
    }
  }
  }
  _tile_release();
}

}  // namespace

bool amx_bf16_usable() {
  static const bool usable = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx_bf16 = edx & (1u << 22), amx_tile = edx & (1u << 24);
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // asm/prctl.h, not in every libc's headers
    return amx_bf16 && amx_tile && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

void amx_bf16_gemm_nt(const uint16_t* a, int64_t lda, int64_t m, const uint32_t* packed_b, int64_t n, int64_t k,
                      const float* bias, float alpha, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  // uninitialised: pack_a writes every element, zeros included (a vector would zero it first, once per call)
  std::unique_ptr<uint16_t[]> packed_a(new uint16_t[static_cast<size_t>(round_up(m, kBlock) * round_up(k, kK))]);
#pragma omp parallel if (m * n * k >= (1 << 20))
  {
    pack_a(a, lda, m, k, packed_a.get());  // ends with the barrier of its omp for
    gemm_blocks(packed_a.get(), m, packed_b, n, k, bias, alpha, c, ldc);
  }
}

#else  // no AMX on this platform: amx_bf16_usable() is false and the rest must not be called

bool amx_bf16_usable() { return false; }

void amx_bf16_gemm_nt(const uint16_t*, int64_t, int64_t, const uint32_t*, int64_t, int64_t, const float*, float,
                      float*, int64_t) {}

#endif

}  // namespace r1k
