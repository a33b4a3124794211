#pragma once
// DeepSeek-V3 routing: per token, scores from the router logits (sigmoid or softmax), a correction bias
// added for the choice only, group-limited selection (a group's score is the sum of its two best biased
// scores; the best topk_group of n_group groups stay eligible), top-k experts by biased score, and weights
// from the unbiased scores, renormalised (+1e-20) and scaled. Every comparison breaks ties toward the lower
// index (expert or group), on the CPU and the GPU alike: the helpers below are shared by both.
#include <cmath>
#include <cstdint>

#include "common/dtype.h"
#include "common/host_device.h"

namespace r1k {

struct RouteProblem {
  int64_t tokens, experts, top_k, n_group, topk_group;
  float routed_scaling_factor;
  bool norm_topk_prob;
  bool softmax;  // scores = softmax(logits) over the experts; otherwise sigmoid(logits)
};

// (value a, index ia) ranks before (value b, index ib): larger value first, the lower index on ties; NaN
// ranks after every number (a NaN logit cannot win a slot from a real one). A strict total order, so a
// warp-wide reduction under it gives every lane the same winner.
R1K_HD bool ranks_before(float a, int64_t ia, float b, int64_t ib) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) return a_nan == b_nan ? ia < ib : b_nan;
  return a > b || (a == b && ia < ib);
}

// exp(x) without a libm call (branch-free, so the CPU loop over a token's experts vectorizes): x = n ln2 + r
// with |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, 2^n by the exponent bits; within 2 ulp of expf over
// the range where sigmoid is not saturated, and saturating to 0 / inf outside it.
R1K_HD float exp_approx(float x) {
  x = x > -87.0f ? x : -87.0f;  // NaN -> -87: every path below stays finite (the caller handles NaN)
  x = x < 88.0f ? x : 88.0f;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23 trick
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two for an exact reduction
  float p = 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * bits_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

R1K_HD float sigmoid(float x) {
  const float s = 1.0f / (1.0f + exp_approx(-x));  // computed unconditionally: a select, not a branch
  return x != x ? x : s;
}

// Keeps the best `size` of the (value, index) pairs offered to it, best first, under ranks_before: one
// comparison against the current last for most offers, an insertion for the few that make the cut.
R1K_HD void offer(float* values, int32_t* indices, int64_t& filled, int64_t size, float v, int32_t i) {
  if (filled == size && !ranks_before(v, i, values[size - 1], indices[size - 1])) return;
  int64_t at = filled < size ? filled++ : size - 1;
  while (at > 0 && ranks_before(v, i, values[at - 1], indices[at - 1])) {
    values[at] = values[at - 1];
    indices[at] = indices[at - 1];
    --at;
  }
  values[at] = v;
  indices[at] = i;
}

// ranks_before as one integer: (value, index) -> a key whose larger values rank first. The value's bits are
// made order-preserving (-0 as +0; NaN lowest), the low half is the index reversed (lower index, larger key).
// Key 0 is below every real key (a spent slot).
R1K_HD uint64_t rank_key(float v, uint32_t index) {
  v = v == 0.0f ? 0.0f : v;
  const uint32_t b = float_bits(v);
  const uint32_t ordered = v != v ? 0u : ((b & 0x80000000u) ? ~b : (b | 0x80000000u));
  return (static_cast<uint64_t>(ordered) << 32) | (0xFFFFFFFFu - index);
}

// Running best two of a group's biased scores -> their sum (the group score).
struct TopTwo {
  float first, second;
  R1K_HD void push(float v) {
    if (v > first || first != first) {
      second = first;
      first = v;
    } else if (v > second || second != second) {
      second = v;
    }
  }
};

// Routing weight of a chosen expert from its unbiased score and the sum over the token's chosen experts.
R1K_HD float route_weight(float score, float chosen_sum, const RouteProblem& p) {
  const float w = p.norm_topk_prob ? score / (chosen_sum + 1e-20f) : score;
  return w * p.routed_scaling_factor;
}

// logits [tokens, experts] (fp32 or bf16, row-major), bias [experts] fp32 or null; weights [tokens, top_k]
// fp32 and ids [tokens, top_k] int32, each token's experts in descending biased score.
void route_cpu(const void* logits, DType dtype, const float* bias, const RouteProblem& p, float* weights,
               int32_t* ids);

#if defined(R1K_WITH_CUDA)
// Returns a CUDA error string, or nullptr on success; `stream` is a cudaStream_t. experts <= 512.
const char* route_cuda(const void* logits, DType dtype, const float* bias, const RouteProblem& p, float* weights,
                       int32_t* ids, void* stream);
#endif

}  // namespace r1k
