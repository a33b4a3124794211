#pragma once
// The AMX tile kernel shared by the CPU GEMMs on AMX (common/amx_bf16_gemm.cpp, fp8/gemm_amx_cpu.cpp): one 32 x 32
// fp32 block of c from two 16-row tiles of packed a and two 16-column VNNI panels of packed b (the layouts both
// files pack into). Include only where R1K_AMX is defined (x86-64 Linux).
#include <immintrin.h>

#include <cstdint>

namespace r1k {
namespace amx {

constexpr int64_t kRows = 16;   // rows of a tile
constexpr int64_t kK = 32;      // bf16 values per tile row (64 bytes)
constexpr int64_t kBlock = 32;  // c is computed in 32 x 32 blocks: 2 x 2 accumulator tiles

// Every tile 16 rows of 64 bytes; loaded once per thread before its tile instructions.
__attribute__((target("amx-tile"))) inline void load_tile_config() {
  struct alignas(64) {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = kRows;
    cfg.colsb[t] = kK * sizeof(uint16_t);
  }
  _tile_loadconfig(&cfg);
}

// out [32 x 32] fp32 (dense) = a rows . b columns over the 32-wide k steps kt0:kt1. a0 / a1: the block's two 16-row
// tile rows of packed a ([k steps][16][32] bf16 each); b0 / b1: its two 16-column panels of packed b ([k steps][16
// pairs][16] words each).
__attribute__((target("amx-tile,amx-bf16"), always_inline)) inline void block_2x2(
    const uint16_t* a0, const uint16_t* a1, const uint32_t* b0, const uint32_t* b1, int64_t kt0, int64_t kt1,
    float* out) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kt = kt0; kt < kt1; ++kt) {
    _tile_loadd(4, a0 + kt * kRows * kK, kK * sizeof(uint16_t));
    _tile_loadd(5, a1 + kt * kRows * kK, kK * sizeof(uint16_t));
    _tile_loadd(6, b0 + kt * kRows * kRows, kRows * sizeof(uint32_t));
    _tile_loadd(7, b1 + kt * kRows * kRows, kRows * sizeof(uint32_t));
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  constexpr int64_t stride = kBlock * sizeof(float);
  _tile_stored(0, out, stride);
  _tile_stored(1, out + kRows, stride);
  _tile_stored(2, out + kRows * kBlock, stride);
  _tile_stored(3, out + kRows * kBlock + kRows, stride);
}

}  // namespace amx
}  // namespace r1k
