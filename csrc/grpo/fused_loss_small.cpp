// The decode-sized fused GRPO loss (see fused_loss_small.h): the three CPU kernels in the order the blocked path
// runs them, their per-token intermediates (lse, d loss / d logp, d loss / d entropy) kept here.
#include "grpo/fused_loss_small.h"

#include <cstddef>
#include <vector>

namespace r1k {

bool grpo_token_loss_fused_small_cpu(const LmHeadProblem& p, const TokenLossTerms& t, bool with_entropy,
                                     float* total, float* logp, float* entropy, float* d_hidden, float* d_weight,
                                     float* d_bias) {
  const std::size_t n = static_cast<std::size_t>(p.n);
  std::vector<float> lse(n), g(n), ge(t.entropy_coef != 0.0f ? n : 0);
  if (!lm_head_logprobs_small_cpu(p, with_entropy, logp, lse.data(), entropy)) return false;
  float* d_entropy = ge.empty() ? nullptr : ge.data();
  grpo_token_loss_grad_cpu(p.n, logp, entropy, t, total, g.data(), d_entropy);
  lm_head_logprobs_small_backward_cpu(p, g.data(), d_entropy, lse.data(), entropy, d_hidden, d_weight, d_bias);
  return true;
}

}  // namespace r1k
