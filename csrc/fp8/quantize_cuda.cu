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
struct Elem {
  using T = uint16_t;
  static constexpr int kVec = 8;  // 16-byte loads of 16-bit elements
};
template <>
struct Elem<DType::kFloat32> {
  using T = float;
  static constexpr int kVec = 4;
};

template <DType D>
__device__ __forceinline__ float to_float(typename Elem<D>::T v) {
  if constexpr (D == DType::kFloat32) return v;
  else if constexpr (D == DType::kFloat16) return fp16_to_float(v);
  else return bf16_to_float(v);
}

// kVec consecutive elements from one 16-byte load (the caller guarantees 16-byte alignment). Unpacked with
// shifts, not through a local array, so nothing touches local memory.
template <DType D>
__device__ __forceinline__ void load_vec(const typename Elem<D>::T* p, float (&v)[Elem<D>::kVec]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (D == DType::kFloat32) {
      v[i] = __uint_as_float(w[i]);
    } else {
      v[2 * i] = to_float<D>(static_cast<uint16_t>(w[i] & 0xFFFFu));
      v[2 * i + 1] = to_float<D>(static_cast<uint16_t>(w[i] >> 16));
    }
  }
}

// One warp per 1 x group tile. VEC: 16-byte loads, and kVec-byte stores of the codes, over the aligned
// body of the group (launcher-checked alignment); the tail of a partial last group goes element by element.
template <DType D, bool VEC>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
quantize_groups_kernel(const void* __restrict__ xv, TileGeometry g, uint8_t* __restrict__ out,
                       float* __restrict__ scales, bool pow2) {
  using T = typename Elem<D>::T;
  constexpr int kVec = Elem<D>::kVec;
  const T* x = static_cast<const T*>(xv);
  const int lane = threadIdx.x & 31;
  const int64_t groups_per_row = (g.cols + g.tile_cols - 1) / g.tile_cols;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (tile >= g.rows * groups_per_row) return;
  const int64_t row = tile / groups_per_row, grp = tile % groups_per_row;
  const int64_t c0 = grp * g.tile_cols;
  const int64_t c1 = c0 + g.tile_cols < g.cols ? c0 + g.tile_cols : g.cols;
  const T* src = x + row * g.row_stride;
  uint8_t* dst = out + row * g.cols;
  const int64_t body_end = VEC ? c0 + (c1 - c0) / kVec * kVec : c0;  // [c0, body_end) in vectors

  float amax = 0.0f;
  if constexpr (VEC) {
    for (int64_t c = c0 + lane * kVec; c < body_end; c += 32 * kVec) {
      float v[kVec];
      load_vec<D>(src + c, v);
#pragma unroll
      for (int i = 0; i < kVec; ++i) amax = nan_max(amax, v[i]);
    }
  }
  for (int64_t c = body_end + lane; c < c1; c += 32) amax = nan_max(amax, to_float<D>(src[c]));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float s = tile_scale(amax, pow2);
  if (lane == 0) scales[row * g.scale_stride_r + grp * g.scale_stride_c] = s;

  if constexpr (VEC) {
    for (int64_t c = c0 + lane * kVec; c < body_end; c += 32 * kVec) {
      float v[kVec];
      load_vec<D>(src + c, v);
      uint32_t lo = 0, hi = 0;  // codes packed little-endian: element i in byte i
#pragma unroll
      for (int i = 0; i < 4; ++i) lo |= static_cast<uint32_t>(e4m3_encode(v[i] / s)) << (8 * i);
      if constexpr (kVec == 8) {
#pragma unroll
        for (int i = 0; i < 4; ++i) hi |= static_cast<uint32_t>(e4m3_encode(v[4 + i] / s)) << (8 * i);
        *reinterpret_cast<uint2*>(dst + c) = make_uint2(lo, hi);
      } else {
        *reinterpret_cast<uint32_t*>(dst + c) = lo;
      }
    }
  }
  for (int64_t c = body_end + lane; c < c1; c += 32) dst[c] = e4m3_encode(to_float<D>(src[c]) / s);
}

template <DType D>
void launch(const void* x, const TileGeometry& g, uint8_t* out, float* scales, bool pow2, dim3 grid,
            cudaStream_t stream) {
  constexpr int kVec = Elem<D>::kVec;
  constexpr int64_t kBytes = sizeof(typename Elem<D>::T);
  // Vector path: 16-byte aligned input rows and groups, and codes rows aligned for kVec-byte stores.
  const bool vec = reinterpret_cast<uintptr_t>(x) % 16 == 0 && (g.row_stride * kBytes) % 16 == 0 &&
                   g.tile_cols % kVec == 0 && reinterpret_cast<uintptr_t>(out) % kVec == 0 && g.cols % kVec == 0;
  const dim3 block(kWarpsPerBlock * 32);
  if (vec) quantize_groups_kernel<D, true><<<grid, block, 0, stream>>>(x, g, out, scales, pow2);
  else quantize_groups_kernel<D, false><<<grid, block, 0, stream>>>(x, g, out, scales, pow2);
}

}  // namespace

const char* quantize_fp8_groups_cuda(const void* x, DType dtype, const TileGeometry& g, uint8_t* out,
                                     float* scales, bool pow2, void* stream) {
  const int64_t tiles = g.rows * ((g.cols + g.tile_cols - 1) / g.tile_cols);
  if (tiles == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>((tiles + kWarpsPerBlock - 1) / kWarpsPerBlock));
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: launch<DType::kFloat32>(x, g, out, scales, pow2, grid, s); break;
    case DType::kFloat16: launch<DType::kFloat16>(x, g, out, scales, pow2, grid, s); break;
    case DType::kBFloat16: launch<DType::kBFloat16>(x, g, out, scales, pow2, grid, s); break;
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace r1k
