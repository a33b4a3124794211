// FP8 E4M3 tile quantization on the CPU: one fused pass per tile (amax from cache, then encode).
// A "tile" is tile_rows x tile_cols: 1 x 128 for per-token-group, 128 x 128 for per-block.
#include "fp8/quantize.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/e4m3.h"

namespace r1k {
namespace {

// Below this many elements a call runs on the calling thread: waking the OpenMP team costs more than the work
// (decode-sized calls).
constexpr int64_t kParallelElements = 1 << 15;

// Each tile row segment is converted to fp32 once into a small buffer; the amax and encode loops over
// it are branch-free and vectorize.
template <typename Load>
void quantize_tiles(Load load, const TileGeometry& g, uint8_t* out, float* scales, bool pow2) {
  const int64_t tiles_r = (g.rows + g.tile_rows - 1) / g.tile_rows;
  const int64_t tiles_c = (g.cols + g.tile_cols - 1) / g.tile_cols;
#pragma omp parallel if (g.rows * g.cols >= kParallelElements)
  {
    // sized to the tile as clipped by the matrix: a decode-sized call must not pay for a 128 x 128 buffer
    std::vector<float> buf(static_cast<size_t>(std::min(g.tile_rows, g.rows) * std::min(g.tile_cols, g.cols)));
#pragma omp for collapse(2) schedule(static)
    for (int64_t tr = 0; tr < tiles_r; ++tr) {
      for (int64_t tc = 0; tc < tiles_c; ++tc) {
        const int64_t r0 = tr * g.tile_rows, nr = std::min(g.rows, r0 + g.tile_rows) - r0;
        const int64_t c0 = tc * g.tile_cols, nc = std::min(g.cols, c0 + g.tile_cols) - c0;
        float amax = 0.0f;
        int has_nan = 0;
        for (int64_t r = 0; r < nr; ++r) {
          float* row = buf.data() + r * nc;
          const int64_t src = (r0 + r) * g.row_stride + c0;
          for (int64_t c = 0; c < nc; ++c) row[c] = load(src + c);
          for (int64_t c = 0; c < nc; ++c) {
            const float a = std::fabs(row[c]);
            amax = a > amax ? a : amax;
            has_nan |= row[c] != row[c];
          }
        }
        const float s = tile_scale(has_nan ? std::nanf("") : amax, pow2);
        scales[tr * g.scale_stride_r + tc * g.scale_stride_c] = s;
        for (int64_t r = 0; r < nr; ++r) {
          const float* row = buf.data() + r * nc;
          uint8_t* dst = out + (r0 + r) * g.cols + c0;
          for (int64_t c = 0; c < nc; ++c) dst[c] = e4m3_encode(row[c] / s);
        }
      }
    }
  }
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

}  // namespace

void quantize_fp8_tiles_cpu(const void* x, DType dtype, const TileGeometry& g, uint8_t* out, float* scales,
                            bool pow2) {
  switch (dtype) {
    case DType::kFloat32: {
      const float* p = static_cast<const float*>(x);
      return quantize_tiles([p](int64_t i) { return p[i]; }, g, out, scales, pow2);
    }
    case DType::kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(x);
      return quantize_tiles([p](int64_t i) { return fp16_to_float(p[i]); }, g, out, scales, pow2);
    }
    case DType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(x);
      return quantize_tiles([p](int64_t i) { return bf16_to_float(p[i]); }, g, out, scales, pow2);
    }
  }
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
