// FP8 E4M3 tile quantization on the CPU: one fused pass per tile (amax from cache, then encode).
// A "tile" is tile_rows x tile_cols: 1 x 128 for per-token-group, 128 x 128 for per-block.
#include "fp8/quantize.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu_isa.h"
#include "common/cpu_vector.h"
#include "common/e4m3.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace r1k {
namespace {

// Below this many elements a call runs on the calling thread: waking the OpenMP team costs more than the work
// (decode-sized calls).
constexpr int64_t kParallelElements = 1 << 15;

// n elements from `src` as fp32 into row (zeros for a padding row): a loop without a branch, which vectorizes.
template <typename Load>
__attribute__((always_inline)) inline void load_row(Load load, int64_t src, int64_t n, bool zero, float* row) {
  if (zero) {
    std::fill(row, row + n, 0.0f);
  } else {
    for (int64_t c = 0; c < n; ++c) row[c] = load(src + c);
  }
}

// |x| maximum and NaN presence over runs of floats. GCC does not vectorize a running maximum (a loop-carried
// select), so it is written with SSE2 (every x86-64 CPU); the maximum does not depend on the order in which it
// is taken, so the tile's scale is the same in every form.
struct Extremes {
  float max = 0.0f;
  bool nan = false;
  void add(const float* x, int64_t n) {
    int64_t c = 0;
#if defined(__SSE2__)
    const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7FFFFFFF));
    __m128 m0 = _mm_set1_ps(max), m1 = m0, unordered = _mm_setzero_ps();
    for (; c + 8 <= n; c += 8) {
      const __m128 x0 = _mm_loadu_ps(x + c), x1 = _mm_loadu_ps(x + c + 4);
      m0 = _mm_max_ps(_mm_and_ps(x0, abs_mask), m0);  // (|x| > m) ? |x| : m, as the scalar loop below
      m1 = _mm_max_ps(_mm_and_ps(x1, abs_mask), m1);
      unordered = _mm_or_ps(unordered, _mm_or_ps(_mm_cmpunord_ps(x0, x0), _mm_cmpunord_ps(x1, x1)));
    }
    alignas(16) float lanes[4];
    _mm_store_ps(lanes, _mm_max_ps(m0, m1));
    for (const float v : lanes) max = v > max ? v : max;
    nan = nan || _mm_movemask_ps(unordered) != 0;
#endif
    for (; c < n; ++c) {
      const float a = std::fabs(x[c]);
      max = a > max ? a : max;
      nan = nan || a != a;
    }
  }
  float amax() const { return nan ? std::nanf("") : max; }  // NaN: the tile's scale is NaN (documented)
};

// Each tile row segment is converted to fp32 once into a small buffer; the loads and the encode loop are
// branch-free and vectorize. Rows whose id in `ids` (when given) is negative load as zeros: MoE padding rows.
template <typename Load>
__attribute__((always_inline)) inline void quantize_tile(Load load, const TileGeometry& g, const int32_t* ids,
                                                         uint8_t* out, float* scales, bool pow2, int64_t tr,
                                                         int64_t tc, float* buf) {
  const int64_t r0 = tr * g.tile_rows, nr = std::min(g.rows, r0 + g.tile_rows) - r0;
  const int64_t c0 = tc * g.tile_cols, nc = std::min(g.cols, c0 + g.tile_cols) - c0;
  Extremes ext;
  for (int64_t r = 0; r < nr; ++r) {
    float* row = buf + r * nc;
    load_row(load, (r0 + r) * g.row_stride + c0, nc, ids != nullptr && ids[r0 + r] < 0, row);
    ext.add(row, nc);
  }
  const float s = tile_scale(ext.amax(), pow2);
  scales[tr * g.scale_stride_r + tc * g.scale_stride_c] = s;
  for (int64_t r = 0; r < nr; ++r) {
    const float* row = buf + r * nc;
    uint8_t* dst = out + (r0 + r) * g.cols + c0;
    for (int64_t c = 0; c < nc; ++c) dst[c] = e4m3_encode(row[c] / s);
  }
}

// x.T quantized with tiles of g.tile_rows tokens x 1 channel (g describes x: rows = tokens, cols = channels).
// Per block of tokens x kChannels channels, the block is read row by row once into a buffer (contiguous loads),
// each channel's amax taken, and each channel's codes written as one contiguous run of x.T's row.
constexpr int64_t kChannels = 64;

template <typename Load>
__attribute__((always_inline)) inline void quantize_transposed_block(Load load, const TileGeometry& g,
                                                                     const int32_t* ids, uint8_t* out,
                                                                     int64_t out_stride, float* scales, int64_t tg,
                                                                     int64_t cc, float* buf) {
  const int64_t t0 = tg * g.tile_rows, nt = std::min(g.rows, t0 + g.tile_rows) - t0;
  const int64_t c0 = cc * kChannels, nc = std::min(g.cols, c0 + kChannels) - c0;
  float amax[kChannels] = {}, scale[kChannels];
  int has_nan[kChannels] = {};
  for (int64_t t = 0; t < nt; ++t) {
    float* row = buf + t * nc;
    load_row(load, (t0 + t) * g.row_stride + c0, nc, ids != nullptr && ids[t0 + t] < 0, row);
    for (int64_t c = 0; c < nc; ++c) {  // per channel: elementwise across c, so this vectorizes
      const float a = std::fabs(row[c]);
      amax[c] = a > amax[c] ? a : amax[c];
      has_nan[c] |= row[c] != row[c];
    }
  }
  for (int64_t c = 0; c < nc; ++c) {
    scale[c] = tile_scale(has_nan[c] ? std::nanf("") : amax[c], false);
    scales[tg * g.scale_stride_r + (c0 + c) * g.scale_stride_c] = scale[c];
  }
  for (int64_t c = 0; c < nc; ++c) {
    uint8_t* dst = out + (c0 + c) * out_stride + t0;
    for (int64_t t = 0; t < nt; ++t) dst[t] = e4m3_encode(buf[t * nc + c] / scale[c]);
  }
}

// Both bodies compiled twice, inlined into a baseline and an AVX2 function (common/cpu_isa.h picks one per
// process): the same elementwise operations and the same maxima, so the same codes and scales, 8 wide.
template <typename Load>
void tile_baseline(Load load, const TileGeometry& g, const int32_t* ids, uint8_t* out, float* scales, bool pow2,
                   int64_t tr, int64_t tc, float* buf) {
  quantize_tile(load, g, ids, out, scales, pow2, tr, tc, buf);
}

template <typename Load>
void transposed_baseline(Load load, const TileGeometry& g, const int32_t* ids, uint8_t* out, int64_t out_stride,
                         float* scales, int64_t tg, int64_t cc, float* buf) {
  quantize_transposed_block(load, g, ids, out, out_stride, scales, tg, cc, buf);
}

#if defined(R1K_X86_AVX2)
template <typename Load>
__attribute__((target("avx2,f16c"))) void tile_avx2(Load load, const TileGeometry& g, const int32_t* ids,
                                                     uint8_t* out, float* scales, bool pow2, int64_t tr, int64_t tc,
                                                     float* buf) {
  quantize_tile(load, g, ids, out, scales, pow2, tr, tc, buf);
}

template <typename Load>
__attribute__((target("avx2,f16c"))) void transposed_avx2(Load load, const TileGeometry& g, const int32_t* ids,
                                                           uint8_t* out, int64_t out_stride, float* scales,
                                                           int64_t tg, int64_t cc, float* buf) {
  quantize_transposed_block(load, g, ids, out, out_stride, scales, tg, cc, buf);
}
#endif

// The form of each body this process runs, picked once per call, outside the parallel loops.
template <typename Load>
auto tile_form() {
#if defined(R1K_X86_AVX2)
  if (cpu_isa() >= CpuIsa::kAvx2) return &tile_avx2<Load>;
#endif
  return &tile_baseline<Load>;
}

template <typename Load>
auto transposed_form() {
#if defined(R1K_X86_AVX2)
  if (cpu_isa() >= CpuIsa::kAvx2) return &transposed_avx2<Load>;
#endif
  return &transposed_baseline<Load>;
}

template <typename Load>
void quantize_tiles(Load load, const TileGeometry& g, const int32_t* ids, uint8_t* out, float* scales, bool pow2) {
  const int64_t tiles_r = (g.rows + g.tile_rows - 1) / g.tile_rows;
  const int64_t tiles_c = (g.cols + g.tile_cols - 1) / g.tile_cols;
  const auto tile = tile_form<Load>();
#pragma omp parallel if (g.rows * g.cols >= kParallelElements)
  {
    // sized to the tile as clipped by the matrix: a decode-sized call must not pay for a 128 x 128 buffer
    std::vector<float> buf(static_cast<size_t>(std::min(g.tile_rows, g.rows) * std::min(g.tile_cols, g.cols)));
#pragma omp for collapse(2) schedule(static)
    for (int64_t tr = 0; tr < tiles_r; ++tr) {
      for (int64_t tc = 0; tc < tiles_c; ++tc) tile(load, g, ids, out, scales, pow2, tr, tc, buf.data());
    }
  }
}

// The padding columns [rows, out_stride) of every x.T row are zero codes.
template <typename Load>
void quantize_transposed(Load load, const TileGeometry& g, const int32_t* ids, uint8_t* out, int64_t out_stride,
                         float* scales) {
  const int64_t groups = (g.rows + g.tile_rows - 1) / g.tile_rows;
  const int64_t chunks = (g.cols + kChannels - 1) / kChannels;
  const auto block = transposed_form<Load>();
#pragma omp parallel if (g.rows * g.cols >= kParallelElements)
  {
    std::vector<float> buf(static_cast<size_t>(std::min(g.tile_rows, g.rows) * std::min(kChannels, g.cols)));
#pragma omp for collapse(2) schedule(static)
    for (int64_t tg = 0; tg < groups; ++tg) {
      for (int64_t cc = 0; cc < chunks; ++cc) block(load, g, ids, out, out_stride, scales, tg, cc, buf.data());
    }
  }
  for (int64_t c = 0; c < g.cols; ++c) std::fill(out + c * out_stride + g.rows, out + (c + 1) * out_stride, 0);
}

template <typename Store>
void dequantize_tiles(const uint8_t* q, const float* scales, const TileGeometry& g, Store store) {
  const float* decode = e4m3_table();
#pragma omp parallel for schedule(static) if (g.rows * g.cols >= kParallelElements)
  for (int64_t r = 0; r < g.rows; ++r) {
    const float* srow = scales + (r / g.tile_rows) * g.scale_stride_r;
    const uint8_t* qrow = q + r * g.row_stride;
    for (int64_t c0 = 0; c0 < g.cols; c0 += g.tile_cols) {  // one scale per tile: the inner loop vectorizes
      const float s = srow[(c0 / g.tile_cols) * g.scale_stride_c];
      const int64_t c1 = c0 + g.tile_cols < g.cols ? c0 + g.tile_cols : g.cols;
      for (int64_t c = c0; c < c1; ++c) store(r * g.cols + c, decode[qrow[c]] * s);
    }
  }
}

// Calls quantize(load) with x's element loader for its dtype.
template <typename Quantize>
void with_loader(const void* x, DType dtype, Quantize quantize) {
  switch (dtype) {
    case DType::kFloat32: {
      const float* p = static_cast<const float*>(x);
      return quantize([p](int64_t i) { return p[i]; });
    }
    case DType::kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(x);
      return quantize([p](int64_t i) { return fp16_to_float(p[i]); });
    }
    case DType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(x);
      return quantize([p](int64_t i) { return bf16_to_float(p[i]); });
    }
  }
}

}  // namespace

void quantize_fp8_tiles_cpu(const void* x, DType dtype, const TileGeometry& g, uint8_t* out, float* scales,
                            bool pow2, const int32_t* ids) {
  with_loader(x, dtype, [&](auto load) { quantize_tiles(load, g, ids, out, scales, pow2); });
}

void quantize_fp8_transposed_cpu(const void* x, DType dtype, const TileGeometry& g, const int32_t* ids, uint8_t* out,
                                 int64_t out_stride, float* scales) {
  with_loader(x, dtype, [&](auto load) { quantize_transposed(load, g, ids, out, out_stride, scales); });
}

void dequantize_fp8_tiles_cpu(const uint8_t* q, const float* scales, const TileGeometry& g, void* out,
                              DType out_dtype) {
  if (out_dtype == DType::kFloat32) {
    float* p = static_cast<float*>(out);
    return dequantize_tiles(q, scales, g, [p](int64_t i, float v) { p[i] = v; });
  }
  uint16_t* p = static_cast<uint16_t*>(out);
  dequantize_tiles(q, scales, g, [p](int64_t i, float v) { p[i] = float_to_bf16_rne(v); });
}

}  // namespace r1k
