#pragma once
// The fused GRPO token loss of a decode-sized problem on the CPU in one call: the LM head's forward statistics, the
// token loss and its derivative, and the LM head's backward (the three kernels r1kernels/grpo/fused_loss.py calls
// one by one for larger problems). At these sizes each call from Python, with its own outputs and scratch
// tensors, costs more than its math (benchmarks/bench_dispatch.py).
#include "grpo/lm_head_small.h"
#include "grpo/token_loss.h"

namespace r1k {

// total (0-d), logp [n], entropy [n] (zeros unless with_entropy), and the fp32 gradients of total: d_hidden [n, h],
// d_weight [v, h], d_bias [v] (null without a bias), dense and overwritten. Tokens of weight 0 are reported as in
// grpo_token_loss_grad_cpu. Returns false, writing nothing useful, when an id lies outside [0, v).
bool grpo_token_loss_fused_small_cpu(const LmHeadProblem& p, const TokenLossTerms& t, bool with_entropy,
                                     float* total, float* logp, float* entropy, float* d_hidden, float* d_weight,
                                     float* d_bias);

}  // namespace r1k
