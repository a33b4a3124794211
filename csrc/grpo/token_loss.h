#pragma once
// The GRPO loss of each token and its derivative w.r.t. the token's log-prob, on the CPU: the C++ twin of
// `block_gradients` in r1kernels/grpo/token_loss.py (the same written-out derivative, the same torch conventions:
// clamp passes the gradient at its bounds, minimum splits it at a tie, NaN propagates). At decode sizes its
// few dozen PyTorch ops cost ~100 us; this loop costs a few.
#include <cstdint>

namespace r1k {

// Per-token inputs [n] fp32 (old, ref, is_ratio may be null: on-policy, no KL term, no rollout weight) and the
// loss's scalars. ref is used only when beta > 0; delta only when has_delta.
struct TokenLossTerms {
  const float* weight;  // aggregation weight of each token
  const float* adv;
  const float* old;
  const float* ref;
  const float* is_ratio;
  float beta, epsilon_low, epsilon_high, delta;
  bool has_delta;
  float clamp, entropy_coef;
  bool unbiased_kl;
};

// total = sum(weight * token_loss) (summed in double, stored as fp32); d_logp [n] = weight * d token_loss / d logp;
// d_entropy [n] = -entropy_coef * weight, written only when entropy_coef != 0 (entropy is read only then; it may
// be null otherwise). Tokens of weight 0 are not part of the loss: they add nothing (whatever their log-prob,
// NaN included), their gradients are 0, and their logp (and entropy, when given) are set to 0 in place, which is
// how the fused loss reports them.
void grpo_token_loss_grad_cpu(int64_t n, float* logp, float* entropy, const TokenLossTerms& t, float* total,
                              float* d_logp, float* d_entropy);

}  // namespace r1k
