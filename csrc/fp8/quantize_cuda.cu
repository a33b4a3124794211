// Per-token-group FP8 quantization on the GPU: one warp per 1 x group tile. The Triton kernel is the
// default GPU path; this CUDA twin shares e4m3_encode / tile_scale with the CPU kernel, so the
// arithmetic the CPU tests check is the arithmetic that runs here.
#include <cuda_runtime.h>

#include "common/e4m3.h"
#include "fp8/quantize.h"

namespace r1k {
namespace {

constexpr int kWarpsPerBlock = 8;

template <DType D>
__device__ __forceinline__ float load_elem(const void* x, int64_t i) {
  if constexpr (D == DType::kFloat32) return static_cast<const float*>(x)[i];
  else if constexpr (D == DType::kFloat16) return fp16_to_float(static_cast<const uint16_t*>(x)[i]);
  else return bf16_to_float(static_cast<const uint16_t*>(x)[i]);
}

template <DType D>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
quantize_groups_kernel(const void* __restrict__ x, TileGeometry g, uint8_t* __restrict__ out,
                       float* __restrict__ scales, bool pow2) {
  const int lane = threadIdx.x & 31;
  const int64_t groups_per_row = (g.cols + g.tile_cols - 1) / g.tile_cols;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (tile >= g.rows * groups_per_row) return;
  const int64_t row = tile / groups_per_row, grp = tile % groups_per_row;
  const int64_t c0 = grp * g.tile_cols;
  const int64_t c1 = c0 + g.tile_cols < g.cols ? c0 + g.tile_cols : g.cols;
  const int64_t base = row * g.row_stride;

  float amax = 0.0f;
  for (int64_t c = c0 + lane; c < c1; c += 32) amax = nan_max(amax, load_elem<D>(x, base + c));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float s = tile_scale(amax, pow2);
  if (lane == 0) scales[row * g.scale_stride_r + grp * g.scale_stride_c] = s;
  for (int64_t c = c0 + lane; c < c1; c += 32) out[row * g.cols + c] = e4m3_encode(load_elem<D>(x, base + c) / s);
}

}  // namespace

const char* quantize_fp8_groups_cuda(const void* x, DType dtype, const TileGeometry& g, uint8_t* out,
                                     float* scales, bool pow2, void* stream) {
  const int64_t tiles = g.rows * ((g.cols + g.tile_cols - 1) / g.tile_cols);
  if (tiles == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>((tiles + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const dim3 block(kWarpsPerBlock * 32);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: quantize_groups_kernel<DType::kFloat32><<<grid, block, 0, s>>>(x, g, out, scales, pow2); break;
    case DType::kFloat16: quantize_groups_kernel<DType::kFloat16><<<grid, block, 0, s>>>(x, g, out, scales, pow2); break;
    case DType::kBFloat16: quantize_groups_kernel<DType::kBFloat16><<<grid, block, 0, s>>>(x, g, out, scales, pow2); break;
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace r1k
