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

#if defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
// GCC 12's AVX-512 intrinsics self-initialise their "undefined" operands, which -Wmaybe-uninitialized reports
// at every use
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define R1K_AMX 1
#endif

#if defined(R1K_AMX)
#include "common/amx_tiles.h"
#include "common/e4m3_avx512.h"
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

// 16 e4m3 codes (the first `count`; the rest of dst untouched) -> bf16 bits: exact, the decoded float's upper half
// (its lower 16 bits are zero). 16 at a time, masked: a row at small K (16 or 32 codes) went through the scalar
// remainder of a plain loop, which GCC vectorized in wider steps.
R1K_AVX512 inline void decode16_bf16(const uint8_t* src, int64_t count, uint16_t* dst) {
  const __mmask16 lanes = count >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << count) - 1);
  const __m512 v = e4m3_decode16_avx512(_mm_maskz_loadu_epi8(lanes, src));
  _mm512_mask_cvtepi32_storeu_epi16(dst, lanes, _mm512_srli_epi32(_mm512_castps_si512(v), 16));
}

R1K_AVX512 void decode_bf16(const uint8_t* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; i += 16) decode16_bf16(src + i, n - i, dst + i);
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
      _mm512_storeu_si512(dst, _mm512_setzero_si512());  // the row's 64 bytes: zeros past k in one store
      if (valid > 0) decode_bf16(a + (r0 + r) * lda + k0, valid, dst);
    }
  }
}

// rows n0:n1 of b [.., k] codes as 16-column panels of VNNI pairs: panel p, k step kt holds 16 x 16 words
// (b[col][2i], b[col][2i + 1]); zeros past n1 (up to a multiple of 32) and past k. A panel's 16 rows are decoded
// into contiguous buffers (vectorized), where each pair already is one 32-bit word; each panel row of 16 words
// (pair i of the 16 rows) is then one gather, 64 contiguous bytes written.
R1K_AVX512 void pack_b(const uint8_t* b, int64_t ldb, int64_t n0, int64_t n1, int64_t k, uint32_t* packed) {
  const int64_t panels = round_up(n1 - n0, kBlock) / kRows, pairs = round_up(k, kK) / 2;
  std::unique_ptr<uint32_t[]> rows(new uint32_t[static_cast<size_t>(kRows * pairs)]);
  const __m512i row_starts = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                _mm512_set1_epi32(static_cast<int>(pairs)));
#pragma omp for schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t j = 0; j < kRows; ++j) {
      uint16_t* row = reinterpret_cast<uint16_t*>(rows.get() + j * pairs);
      const int64_t n = n0 + p * kRows + j, valid = n < n1 ? k : 0;
      for (int64_t i = valid / kK * kK; i < 2 * pairs; i += kK)  // zeros past k, 64 bytes a store (a library call
        _mm512_storeu_si512(row + i, _mm512_setzero_si512());     // per row otherwise, at small k)
      if (valid > 0) decode_bf16(b + n * ldb, valid, row);
    }
    uint32_t* panel = packed + p * pairs * kRows;
    for (int64_t i = 0; i < pairs; ++i)
      _mm512_storeu_si512(panel + i * kRows, _mm512_i32gather_epi32(row_starts, rows.get() + i, 4));
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
  // where each column's scales start in sb, worked out once per chunk: a division per column, block and K block
  // (b_tile_rows is a run-time value) cost as much as the tile products at small K. Two loops: with the choice
  // inside one, GCC divides by 1 too
  std::unique_ptr<int64_t[]> sb_row(new int64_t[static_cast<size_t>(n1 - n0)]);
  if (p.b_tile_rows == 1)
    for (int64_t n = n0; n < n1; ++n) sb_row[n - n0] = n * p.sb_stride_n;
  else
    for (int64_t n = n0; n < n1; ++n) sb_row[n - n0] = n / p.b_tile_rows * p.sb_stride_n;
#pragma omp for collapse(2) schedule(static)
  for (int64_t nb = 0; nb < n_blocks; ++nb) {
    for (int64_t mb = 0; mb < m_blocks; ++mb) {
      const uint32_t* b0 = packed_b + (2 * nb) * pairs * kRows;  // this block's two 16-column panels
      const uint32_t* b1 = b0 + pairs * kRows;
      const uint16_t* a0 = packed_a + (2 * mb) * k_tiles * kRows * kK;  // its two 16-row tile rows
      const uint16_t* a1 = a0 + k_tiles * kRows * kK;
      const int64_t r0 = m0 + mb * kBlock, c0 = n0 + nb * kBlock;
      const int64_t rows = std::min(kBlock, m1 - r0), cols = std::min(kBlock, n1 - c0);
      for (int64_t kb = 0; kb < k_blocks; ++kb) {
        const int64_t kt0 = kb * (kScaleK / kK), kt1 = std::min(k_tiles, kt0 + kScaleK / kK);
        amx::block_2x2(a0, a1, b0, b1, kt0, kt1, part);
        for (int64_t r = 0; r < rows; ++r) row_scale[r] = sa[(r0 + r) * p.sa_stride_m + kb * p.sa_stride_k];
        for (int64_t c = 0; c < cols; ++c)
          col_scale[c] = sb[sb_row[c0 + c - n0] + kb * p.sb_stride_k];
        // the first block's terms stored, not added to zeros (0 + x is x, -0 aside): no pass to clear sum first
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) {
            const float term = part[r * kBlock + c] * (row_scale[r] * col_scale[c]);
            sum[r * kBlock + c] = kb == 0 ? term : sum[r * kBlock + c] + term;
          }
      }
      for (int64_t r = 0; r < rows; ++r) {  // + c, then one rounding into out's dtype (branches outside the loops)
        float* s = sum + r * kBlock;
        const int64_t at = (r0 + r) * p.out_stride_m + c0, c_at = (r0 + r) * p.c_stride_m + c0;
        if (c != nullptr)
          for (int64_t col = 0; col < cols; ++col) s[col] += load_float(c, c_dtype, c_at + col);
        if (out_dtype == DType::kFloat32) {
          // a whole row in a fixed-size copy, which compiles to two vector moves (GCC turns a copy loop of run-time
          // length into a library call, which cost more than the tile products at small K)
          if (cols == kBlock)
            std::memcpy(static_cast<float*>(out) + at, s, kBlock * sizeof(float));
          else
            std::memcpy(static_cast<float*>(out) + at, s, static_cast<size_t>(cols) * sizeof(float));
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
  const auto chunks = [&] {
    for (int64_t m0 = 0; m0 < p.m; m0 += kChunkRows) {
      const int64_t m1 = std::min(p.m, m0 + kChunkRows);
      pack_a(a, p.a_stride_m, m0, m1, p.k, packed_a.get());  // each ends with its omp for's barrier
      for (int64_t n0 = 0; n0 < p.n; n0 += kChunkRows) {
        const int64_t n1 = std::min(p.n, n0 + kChunkRows);
        pack_b(b, p.b_stride_n, n0, n1, p.k, packed_b.get());
        gemm_chunk(packed_a.get(), packed_b.get(), sa, sb, c, c_dtype, out, out_dtype, p, m0, m1, n0, n1);
      }
    }
  };
  // small products on the calling thread alone, outside any parallel region (whose set-up costs even when an if()
  // clause keeps it to one thread); the loops' omp for directives then run it all
  if (p.m * p.n * p.k >= (1 << 20)) {
#pragma omp parallel
    chunks();
  } else {
    chunks();
  }
#else
  (void)a, (void)sa, (void)b, (void)sb, (void)c, (void)c_dtype, (void)out, (void)out_dtype, (void)p;
#endif
}

}  // namespace r1k
