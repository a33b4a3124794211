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

R1K_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

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
