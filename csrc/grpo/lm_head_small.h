#pragma once
// The LM-head log-prob of decode-sized problems on the CPU, forward and backward, in one call each: at these
// sizes (N x V x H up to ~1M multiply-adds) a few dozen PyTorch ops cost more than the math. Larger problems
// take the blocked PyTorch path (r1kernels/grpo/lm_head_cpu.py), whose GEMMs run on oneDNN / MKL.
#include <cstdint>

#include "common/dtype.h"

namespace r1k {

// hidden [n, h] (row stride stride_h), weight [v, h] (row stride stride_w), bias [v] or null, all of `dtype`;
// ids [n] int64; logits z = (hidden @ weight.T + bias) * inv_t, accumulated in fp32.
struct LmHeadProblem {
  const void* hidden;
  const void* weight;
  const void* bias;
  DType dtype;
  const int64_t* ids;
  int64_t n, v, h, stride_h, stride_w;
  float inv_t;
};

// logp [n], lse [n], entropy [n] (zeros unless with_entropy) fp32. Returns false, writing nothing
// useful, when an id lies outside [0, v). `logits`: null, or fp32 scratch [n, v] where the logits are kept for the
// backward below (the fused loss's one call), which then reads them instead of recomputing them: the same bits.
bool lm_head_logprobs_small_cpu(const LmHeadProblem& p, bool with_entropy, float* logp, float* lse, float* entropy,
                                float* logits = nullptr);

// Gradients of sum(g * logp + ge * entropy) (ge may be null; v >= 1) into fp32 d_hidden [n, h], d_weight [v, h] and
// d_bias [v] (may be null), all dense and overwritten. Rows whose g (and ge) are exactly 0 are left out: their d
// hidden is 0 and they add nothing, whatever their hidden state holds (NaN included).
// `logits`: null, or the forward's kept logits (overwritten).
void lm_head_logprobs_small_backward_cpu(const LmHeadProblem& p, const float* g, const float* ge, const float* lse,
                                         const float* entropy, float* d_hidden, float* d_weight, float* d_bias,
                                         float* logits = nullptr);

}  // namespace r1k
