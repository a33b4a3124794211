// DeepSeek-V3 routing on the GPU: one warp per token, the token's scores in shared memory, each selection
// round a warp-wide arg-max under route.h's ranking (a strict total order: ties to the lower index), so it
// picks exactly what the CPU twin picks. Lane l owns experts (and groups) l, l + 32, ...: what it has
// already taken is a bit mask in its registers.
#include <cuda_runtime.h>

#include <cmath>

#include "common/host_device.h"
#include "moe/route.h"

namespace r1k {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxExperts = 512;  // 16 per lane: the taken masks fit 16 bits

struct Candidate {
  float value;
  int index;  // -1: none
};

__device__ __forceinline__ bool better(const Candidate& a, const Candidate& b) {
  return a.index >= 0 && (b.index < 0 || ranks_before(a.value, a.index, b.value, b.index));
}

__device__ __forceinline__ Candidate warp_best(Candidate c) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const Candidate o{__shfl_xor_sync(0xffffffffu, c.value, off), __shfl_xor_sync(0xffffffffu, c.index, off)};
    if (better(o, c)) c = o;
  }
  return c;
}

// The best of values[i] over this lane's i = lane + 32 j < n not yet in `taken`, then across the warp.
__device__ __forceinline__ Candidate best_remaining(const float* values, int n, int lane, uint32_t taken) {
  Candidate c{0.0f, -1};
  for (int i = lane, j = 0; i < n; i += 32, ++j)
    if (!(taken >> j & 1u) && better(Candidate{values[i], i}, c)) c = {values[i], i};
  return warp_best(c);
}

__global__ void __launch_bounds__(kWarps * 32)
route_kernel(const void* __restrict__ logits, DType dtype, const float* __restrict__ bias, RouteProblem p,
             float* __restrict__ weights, int32_t* __restrict__ ids) {
  __shared__ float score_smem[kWarps][kMaxExperts];
  __shared__ float choice_smem[kWarps][kMaxExperts];
  __shared__ float group_smem[kWarps][kMaxExperts];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= p.tokens) return;  // whole warps exit together: the shuffles below stay full-warp
  const int E = static_cast<int>(p.experts);
  float* score = score_smem[warp];
  float* choice = choice_smem[warp];

  float mx = -INFINITY;
  for (int e = lane; e < E; e += 32) {
    const int64_t i = t * E + e;
    const float l = dtype == DType::kBFloat16 ? bf16_to_float(static_cast<const uint16_t*>(logits)[i])
                                              : static_cast<const float*>(logits)[i];
    score[e] = l;
    mx = fmaxf(mx, l);
  }
  if (p.softmax) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float sum = 0.0f;
    for (int e = lane; e < E; e += 32) sum += (score[e] = expf(score[e] - mx));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    for (int e = lane; e < E; e += 32) score[e] /= sum;
  } else {
    for (int e = lane; e < E; e += 32) score[e] = sigmoid(score[e]);
  }
  for (int e = lane; e < E; e += 32) choice[e] = score[e] + (bias ? bias[e] : 0.0f);
  __syncwarp();

  if (p.n_group > 1) {
    const int G = static_cast<int>(p.n_group), per_group = E / G;
    float* group_score = group_smem[warp];
    for (int g = lane; g < G; g += 32) {
      TopTwo two{-INFINITY, -INFINITY};
      for (int e = g * per_group; e < (g + 1) * per_group; ++e) two.push(choice[e]);
      group_score[g] = two.first + two.second;
    }
    __syncwarp();
    uint32_t kept = 0;
    for (int r = 0; r < p.topk_group; ++r) {
      const int g = best_remaining(group_score, G, lane, kept).index;
      if (g % 32 == lane) kept |= 1u << (g / 32);
    }
    __syncwarp();
    for (int g = lane, j = 0; g < G; g += 32, ++j)  // groups not kept: their experts out of the choice
      if (!(kept >> j & 1u))
        for (int e = g * per_group; e < (g + 1) * per_group; ++e) choice[e] = -INFINITY;
    __syncwarp();
  }

  float chosen_sum = 0.0f;
  uint32_t taken = 0;
  int32_t* my_ids = ids + t * p.top_k;
  for (int r = 0; r < p.top_k; ++r) {
    const int e = best_remaining(choice, E, lane, taken).index;
    if (e % 32 == lane) taken |= 1u << (e / 32);
    chosen_sum += score[e];
    if (lane == 0) my_ids[r] = e;
  }
  __syncwarp();  // lane 0's id stores are visible to the warp from here
  for (int r = lane; r < p.top_k; r += 32) weights[t * p.top_k + r] = route_weight(score[my_ids[r]], chosen_sum, p);
}

}  // namespace

const char* route_cuda(const void* logits, DType dtype, const float* bias, const RouteProblem& p, float* weights,
                       int32_t* ids, void* stream) {
  if (p.experts > kMaxExperts) return "experts must be <= 512";
  if (p.tokens == 0) return nullptr;
  const int64_t blocks = (p.tokens + kWarps - 1) / kWarps;
  route_kernel<<<static_cast<unsigned>(blocks), kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(
      logits, dtype, bias, p, weights, ids);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace r1k
