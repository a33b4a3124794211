// The decode-sized fused GRPO loss (see fused_loss_small.h): the three CPU kernels in the order the blocked path
// runs them, their per-token intermediates (lse, d loss / d logp, d loss / d entropy) kept here.
#include "grpo/fused_loss_small.h"

#include <cstddef>
#include <vector>

namespace r1k {

bool grpo_token_loss_fused_small_cpu(const LmHeadProblem& p, const TokenLossTerms& t, bool with_entropy,
                                     float* total, float* logp, float* entropy, float* d_hidden, float* d_weight,
                                     float* d_bias) {
  // per token: lse, d loss / d logp, d loss / d entropy; then every row's logits, kept from the forward for the
  // backward. In one buffer kept per thread: at decode sizes allocations were a visible share of the call.
  static thread_local std::vector<float> scratch;
  const std::size_t n = static_cast<std::size_t>(p.n), size = 3 * n + n * static_cast<std::size_t>(p.v);
  if (scratch.size() < size) scratch.resize(size);
  float *lse = scratch.data(), *g = lse + n, *ge = g + n, *logits = ge + n;
  if (!lm_head_logprobs_small_cpu(p, with_entropy, logp, lse, entropy, logits)) return false;
  float* d_entropy = t.entropy_coef != 0.0f ? ge : nullptr;
  grpo_token_loss_grad_cpu(p.n, logp, entropy, t, total, g, d_entropy);
  lm_head_logprobs_small_backward_cpu(p, g, d_entropy, lse, entropy, d_hidden, d_weight, d_bias, logits);
  return true;
}

}  // namespace r1k
