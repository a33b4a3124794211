// Per-token GRPO loss and d loss / d logp on the CPU (see token_loss.h), line for line with block_gradients.
#include "grpo/token_loss.h"

#include <cmath>

namespace r1k {
namespace {

// torch.clamp: NaN stays NaN (every comparison with it is false).
float clamp(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Where torch.clamp passes the gradient (inclusive bounds): 1, else 0 (NaN: 0).
float passes(float x, float lo, float hi) { return x >= lo && x <= hi ? 1.0f : 0.0f; }

// torch.minimum: NaN if either is NaN.
float minimum(float a, float b) { return std::isnan(a) || std::isnan(b) ? NAN : (a < b ? a : b); }

}  // namespace

void grpo_token_loss_grad_cpu(int64_t n, float* logp, float* entropy, const TokenLossTerms& t, float* total,
                              float* d_logp, float* d_entropy) {
  const bool kl = t.beta > 0 && t.ref != nullptr, with_entropy = t.entropy_coef != 0.0f;
  const float lo = 1 - t.epsilon_low, hi = 1 + t.epsilon_high, c = t.clamp;
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (t.weight[i] == 0.0f) {  // not part of the loss (padding): reported as 0, no gradient
      logp[i] = 0.0f;
      if (entropy) entropy[i] = 0.0f;
      d_logp[i] = 0.0f;
      if (with_entropy) d_entropy[i] = 0.0f;
      continue;
    }
    const float lp = logp[i], adv = t.adv[i];
    const float raw = lp - (t.old ? t.old[i] : lp);  // on-policy: logp - logp (0, or NaN for a NaN logp)
    const float ratio = std::exp(clamp(raw, -c, c));
    const float d_ratio = ratio * passes(raw, -c, c);
    const float capped = t.has_delta && ratio > t.delta ? t.delta : ratio;
    const float d_capped = t.has_delta ? passes(ratio, -INFINITY, t.delta) : 1.0f;
    const float clipped = clamp(ratio, lo, hi), d_clipped = passes(ratio, lo, hi);
    const float a = capped * adv, b = clipped * adv;
    const float share_a = (a < b ? 1.0f : 0.0f) + 0.5f * (a == b ? 1.0f : 0.0f);  // which branch minimum() takes
    float d = -adv * (share_a * d_capped + (1 - share_a) * d_clipped) * d_ratio;
    float loss = -minimum(a, b);
    if (t.is_ratio) {
      d *= t.is_ratio[i];
      loss *= t.is_ratio[i];
    }
    if (kl) {
      const float raw_d = t.ref[i] - lp, dk = clamp(raw_d, -c, c);
      float k3 = std::exp(dk) - dk - 1, d_kl = -std::expm1(dk) * passes(raw_d, -c, c);
      if (t.unbiased_kl) {  // d (ratio * k3) = k3 d ratio + ratio d k3
        d_kl = (std::expm1(dk) - dk) * d_ratio + ratio * d_kl;
        k3 *= ratio;
      }
      loss += t.beta * k3;
      d += t.beta * d_kl;
    }
    if (with_entropy) {
      loss -= t.entropy_coef * entropy[i];
      d_entropy[i] = -t.entropy_coef * t.weight[i];
    }
    sum += static_cast<double>(t.weight[i] * loss);
    d_logp[i] = t.weight[i] * d;
  }
  *total = static_cast<float>(sum);
}

}  // namespace r1k
