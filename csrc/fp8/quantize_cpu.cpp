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
// Rows whose id in `ids` (when given) is negative load as zeros: MoE padding rows.
template <typename Load>
void quantize_tiles(Load load, const TileGeometry& g, const int32_t* ids, uint8_t* out, float* scales, bool pow2) {
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
          const bool zero = ids != nullptr && ids[r0 + r] < 0;
          for (int64_t c = 0; c < nc; ++c) row[c] = zero ? 0.0f : load(src + c);
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

// x.T quantized with tiles of g.tile_rows tokens x 1 channel (g describes x: rows = tokens, cols = channels).
// Per block of tokens x kChannels channels, the block is read row by row once into a buffer (contiguous loads),
// each channel's amax taken, and each channel's codes written as one contiguous run of x.T's row. The padding
// columns [rows, out_stride) of every x.T row are zero codes.
template <typename Load>
void quantize_transposed(Load load, const TileGeometry& g, const int32_t* ids, uint8_t* out, int64_t out_stride,
                         float* scales) {
  constexpr int64_t kChannels = 64;
  const int64_t groups = (g.rows + g.tile_rows - 1) / g.tile_rows;
  const int64_t chunks = (g.cols + kChannels - 1) / kChannels;
#pragma omp parallel if (g.rows * g.cols >= kParallelElements)
  {
    std::vector<float> buf(static_cast<size_t>(std::min(g.tile_rows, g.rows) * std::min(kChannels, g.cols)));
#pragma omp for collapse(2) schedule(static)
    for (int64_t tg = 0; tg < groups; ++tg) {
      for (int64_t cc = 0; cc < chunks; ++cc) {
        const int64_t t0 = tg * g.tile_rows, nt = std::min(g.rows, t0 + g.tile_rows) - t0;
        const int64_t c0 = cc * kChannels, nc = std::min(g.cols, c0 + kChannels) - c0;
        float amax[kChannels] = {}, scale[kChannels];
        int has_nan[kChannels] = {};
        for (int64_t t = 0; t < nt; ++t) {
          float* row = buf.data() + t * nc;
          const int64_t src = (t0 + t) * g.row_stride + c0;
          const bool zero = ids != nullptr && ids[t0 + t] < 0;
          for (int64_t c = 0; c < nc; ++c) row[c] = zero ? 0.0f : load(src + c);
          for (int64_t c = 0; c < nc; ++c) {
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
