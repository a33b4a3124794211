// Block-scaled FP8 GEMM on AMX tiles (see gemm_amx.h). Operands are decoded to bf16 and packed chunk by chunk
// (at most kChunkRows rows of each at a time: bounded memory, as the dequantize path had), the layouts of
// common/amx_bf16_gemm.cpp: a as 16 x 32 tiles, b as VNNI pairs in 16-column panels, every tile load 1 KiB of
// contiguous memory. Each 32 x 32 block of out keeps an fp32 sum in a buffer; per K block its four accumulator
// tiles are summed over the block's four 32-wide steps (fewer in a last block shorter than 128: K is packed only
// to a multiple of 32), stored, scaled and added.
#include "fp8/gemm_amx.h"

#include <algorithm>
#include <cstring>
#include <memory>

#include "common/dtype_io.h"
#include "common/e4m3.h"

#if defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#define R1K_AMX 1
#endif

#if defined(R1K_AMX)
#include "common/amx_tiles.h"
#endif

namespace r1k {
namespace {

constexpr int64_t kRows = 16;        // rows of a tile
constexpr int64_t kK = 32;           // bf16 values per tile row
constexpr int64_t kScaleK = 128;     // K per scale block: four tile steps
constexpr int64_t kBlock = 32;       // out is computed in 32 x 32 blocks (2 x 2 accumulator tiles)
constexpr int64_t kChunkRows = 1024; // rows of a and of b decoded and packed at a time

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

#if defined(R1K_AMX)

// Every CPU with AMX has AVX-512: the decode loops are compiled for it (they run only where AMX does).
#define R1K_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// n e4m3 codes -> bf16 bits: exact, the decoded float's upper half (its lower 16 bits are zero). e4m3_decode is
// branch-free, so this loop vectorizes.
R1K_AVX512 void decode_bf16(const uint8_t* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<uint16_t>(float_bits(e4m3_decode(src[i])) >> 16);
}

// rows r0:r1 of a [.., k] codes as [rows/16][k_tiles][16][32] bf16 tiles; zeros past r1 (up to a multiple of 32)
// and past k.
R1K_AVX512 void pack_a(const uint8_t* a, int64_t lda, int64_t r0, int64_t r1, int64_t k, uint16_t* packed) {
  const int64_t rows = round_up(r1 - r0, kBlock), k_tiles = round_up(k, kK) / kK;
#pragma omp for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      uint16_t* dst = packed + ((r / kRows * k_tiles + kt) * kRows + r % kRows) * kK;
      const int64_t k0 = kt * kK, valid = r0 + r < r1 ? std::clamp<int64_t>(k - k0, 0, kK) : 0;
      if (valid > 0) decode_bf16(a + (r0 + r) * lda + k0, valid, dst);
      std::fill(dst + valid, dst + kK, uint16_t{0});
    }
  }
}

// rows n0:n1 of b [.., k] codes as 16-column panels of VNNI pairs: panel p, k step kt holds 16 x 16 words
// (b[col][2i], b[col][2i + 1]); zeros past n1 (up to a multiple of 32) and past k. A panel's 16 rows are decoded
// into contiguous buffers (vectorized), where each pair already is one little-endian word; the words are then
// written panel-row by panel-row, 64 contiguous bytes at a time.
R1K_AVX512 void pack_b(const uint8_t* b, int64_t ldb, int64_t n0, int64_t n1, int64_t k, uint32_t* packed) {
  const int64_t panels = round_up(n1 - n0, kBlock) / kRows, pairs = round_up(k, kK) / 2;
  std::unique_ptr<uint16_t[]> rows(new uint16_t[static_cast<size_t>(kRows * 2 * pairs)]);
#pragma omp for schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t j = 0; j < kRows; ++j) {
      uint16_t* row = rows.get() + j * 2 * pairs;
      const int64_t n = n0 + p * kRows + j, valid = n < n1 ? k : 0;
      if (valid > 0) decode_bf16(b + n * ldb, valid, row);
      std::fill(row + valid, row + 2 * pairs, uint16_t{0});
    }
    uint32_t* panel = packed + p * pairs * kRows;
    for (int64_t i = 0; i < pairs; ++i)
      for (int64_t j = 0; j < kRows; ++j) std::memcpy(panel + i * kRows + j, rows.get() + j * 2 * pairs + 2 * i, 4);
  }
}

// out rows m0:m1 x columns n0:n1 from the packed chunks.
__attribute__((target("amx-tile,amx-bf16,avx512f"))) void gemm_chunk(const uint16_t* packed_a, const uint32_t* packed_b,
                                                               const float* sa, const float* sb, const void* c,
                                                               DType c_dtype, void* out, DType out_dtype,
                                                               const Fp8GemmProblem& p, int64_t m0, int64_t m1,
                                                               int64_t n0, int64_t n1) {
  amx::load_tile_config();
  // K is packed to a multiple of the tile step only: a last scale block shorter than 128 takes fewer steps
  const int64_t k_blocks = round_up(p.k, kScaleK) / kScaleK, k_tiles = round_up(p.k, kK) / kK;
  const int64_t pairs = k_tiles * kK / 2;
  const int64_t m_blocks = round_up(m1 - m0, kBlock) / kBlock, n_blocks = round_up(n1 - n0, kBlock) / kBlock;
  alignas(64) float part[kBlock * kBlock], sum[kBlock * kBlock];
  float row_scale[kBlock], col_scale[kBlock];
#pragma omp for collapse(2) schedule(static)
  for (int64_t nb = 0; nb < n_blocks; ++nb) {
    for (int64_t mb = 0; mb < m_blocks; ++mb) {
      const uint32_t* b0 = packed_b + (2 * nb) * pairs * kRows;  // this block's two 16-column panels
      const uint32_t* b1 = b0 + pairs * kRows;
      const uint16_t* a0 = packed_a + (2 * mb) * k_tiles * kRows * kK;  // its two 16-row tile rows
      const uint16_t* a1 = a0 + k_tiles * kRows * kK;
      const int64_t r0 = m0 + mb * kBlock, c0 = n0 + nb * kBlock;
      const int64_t rows = std::min(kBlock, m1 - r0), cols = std::min(kBlock, n1 - c0);
      std::fill(sum, sum + kBlock * kBlock, 0.0f);
      for (int64_t kb = 0; kb < k_blocks; ++kb) {
        const int64_t kt0 = kb * (kScaleK / kK), kt1 = std::min(k_tiles, kt0 + kScaleK / kK);
        amx::block_2x2(a0, a1, b0, b1, kt0, kt1, part);
        for (int64_t r = 0; r < rows; ++r) row_scale[r] = sa[(r0 + r) * p.sa_stride_m + kb * p.sa_stride_k];
        for (int64_t c = 0; c < cols; ++c)
          col_scale[c] = sb[(c0 + c) / p.b_tile_rows * p.sb_stride_n + kb * p.sb_stride_k];
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c)
            sum[r * kBlock + c] += part[r * kBlock + c] * (row_scale[r] * col_scale[c]);
      }
      for (int64_t r = 0; r < rows; ++r) {  // + c, then one rounding into out's dtype (branches outside the loops)
        float* s = sum + r * kBlock;
        const int64_t at = (r0 + r) * p.out_stride_m + c0, c_at = (r0 + r) * p.c_stride_m + c0;
        if (c != nullptr)
          for (int64_t col = 0; col < cols; ++col) s[col] += load_float(c, c_dtype, c_at + col);
        if (out_dtype == DType::kFloat32) {
          std::copy(s, s + cols, static_cast<float*>(out) + at);
        } else {
          uint16_t* o = static_cast<uint16_t*>(out) + at;
          for (int64_t col = 0; col < cols; ++col) o[col] = float_to_bf16_rne(s[col]);
        }
      }
    }
  }
  _tile_release();
}

#endif

}  // namespace

void fp8_gemm_amx_cpu(const uint8_t* a, const float* sa, const uint8_t* b, const float* sb, const void* c,
                      DType c_dtype, void* out, DType out_dtype, const Fp8GemmProblem& p) {
#if defined(R1K_AMX)
  if (p.m <= 0 || p.n <= 0) return;
  const int64_t k_padded = round_up(p.k, kK);
  const int64_t a_rows = round_up(std::min(p.m, kChunkRows), kBlock);
  const int64_t b_rows = round_up(std::min(p.n, kChunkRows), kBlock);
  std::unique_ptr<uint16_t[]> packed_a(new uint16_t[static_cast<size_t>(a_rows * k_padded)]);
  std::unique_ptr<uint32_t[]> packed_b(new uint32_t[static_cast<size_t>(b_rows * k_padded / 2)]);
#pragma omp parallel if (p.m * p.n * p.k >= (1 << 20))
  for (int64_t m0 = 0; m0 < p.m; m0 += kChunkRows) {
    const int64_t m1 = std::min(p.m, m0 + kChunkRows);
    pack_a(a, p.a_stride_m, m0, m1, p.k, packed_a.get());  // each ends with its omp for's barrier
    for (int64_t n0 = 0; n0 < p.n; n0 += kChunkRows) {
      const int64_t n1 = std::min(p.n, n0 + kChunkRows);
      pack_b(b, p.b_stride_n, n0, n1, p.k, packed_b.get());
      gemm_chunk(packed_a.get(), packed_b.get(), sa, sb, c, c_dtype, out, out_dtype, p, m0, m1, n0, n1);
    }
  }
#else
  (void)a, (void)sa, (void)b, (void)sb, (void)c, (void)c_dtype, (void)out, (void)out_dtype, (void)p;
#endif
}

}  // namespace r1k
