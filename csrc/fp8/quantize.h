#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace r1k {

// A row-major [rows, cols] matrix cut into tile_rows x tile_cols tiles, one fp32 scale per tile at
// scales[tile_r * scale_stride_r + tile_c * scale_stride_c] (strides in elements; M-major layouts
// are just other strides). The quantized / dequantized output is dense row-major.
struct TileGeometry {
  int64_t rows, cols, row_stride;
  int64_t tile_rows, tile_cols;
  int64_t scale_stride_r, scale_stride_c;
};

// ids: optional [rows] int32; rows with a negative id are quantized as zeros (MoE padding rows).
void quantize_fp8_tiles_cpu(const void* x, DType dtype, const TileGeometry& g, uint8_t* out, float* scales,
                            bool pow2, const int32_t* ids = nullptr);
// x.T [cols, out_stride] in E4M3 (columns past g.rows zero codes) with one scale per g.tile_rows x 1 tile of x
// (g.tile_cols must be 1; scales at tile_r * scale_stride_r + col * scale_stride_c); ids as above.
void quantize_fp8_transposed_cpu(const void* x, DType dtype, const TileGeometry& g, const int32_t* ids, uint8_t* out,
                                 int64_t out_stride, float* scales);
// out_dtype: kFloat32 or kBFloat16.
void dequantize_fp8_tiles_cpu(const uint8_t* q, const float* scales, const TileGeometry& g, void* out,
                              DType out_dtype);

#if defined(R1K_WITH_CUDA)
// Per-token-group quantization (tile 1 x tile_cols) on the GPU; `stream` is a cudaStream_t.
// Returns a CUDA error string, or nullptr on success.
const char* quantize_fp8_groups_cuda(const void* x, DType dtype, const TileGeometry& g, uint8_t* out,
                                     float* scales, bool pow2, void* stream);
#endif

}  // namespace r1k
