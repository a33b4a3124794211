// Python bindings of the GRPO family. Every argument is named (py::arg); the problem travels as a struct.
#include "grpo/bindings.h"

#include "common/pybind_util.h"
#include "grpo/fused_loss_small.h"
#include "grpo/lm_head_small.h"
#include "grpo/token_loss.h"

namespace py = pybind11;

namespace r1k {

void register_grpo(py::module_& m) {
  py::class_<LmHeadProblem>(m, "LmHeadProblem",
                            "hidden [n, h], weight [v, h], bias [v] (0: none) of `dtype` by address and row "
                            "stride, int64 ids [n], inverse temperature.")
      .def(py::init([](uintptr_t hidden, uintptr_t weight, uintptr_t bias, DType dtype, uintptr_t ids, int64_t n,
                       int64_t v, int64_t h, int64_t stride_h, int64_t stride_w, float inv_t) {
             return LmHeadProblem{ptr<const void>(hidden), ptr<const void>(weight), ptr<const void>(bias), dtype,
                                  ptr<const int64_t>(ids), n, v, h, stride_h, stride_w, inv_t};
           }),
           py::kw_only(), py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("dtype"), py::arg("ids"),
           py::arg("n"), py::arg("v"), py::arg("h"), py::arg("stride_h"), py::arg("stride_w"), py::arg("inv_t"));

  m.def(
      "lm_head_logprobs_small_cpu",
      [](const LmHeadProblem& problem, bool with_entropy, uintptr_t logp, uintptr_t lse, uintptr_t entropy) {
        return lm_head_logprobs_small_cpu(problem, with_entropy, ptr<float>(logp), ptr<float>(lse),
                                          ptr<float>(entropy));
      },
      py::kw_only(), py::arg("problem"), py::arg("with_entropy"), py::arg("logp"), py::arg("lse"),
      py::arg("entropy"),
      "Log-probs, log-sum-exp and entropy of a decode-sized LM head (fp32 outputs); False if an id is out of "
      "range.");

  m.def(
      "lm_head_logprobs_small_backward_cpu",
      [](const LmHeadProblem& problem, uintptr_t g, uintptr_t ge, uintptr_t lse, uintptr_t entropy,
         uintptr_t d_hidden, uintptr_t d_weight, uintptr_t d_bias) {
        lm_head_logprobs_small_backward_cpu(problem, ptr<const float>(g), ptr<const float>(ge),
                                            ptr<const float>(lse), ptr<const float>(entropy), ptr<float>(d_hidden),
                                            ptr<float>(d_weight), ptr<float>(d_bias));
      },
      py::kw_only(), py::arg("problem"), py::arg("g"), py::arg("ge"), py::arg("lse"), py::arg("entropy"),
      py::arg("d_hidden"), py::arg("d_weight"), py::arg("d_bias"),
      "fp32 gradients of sum(g * logp + ge * entropy) (ge, d_bias: 0 for none) of a decode-sized LM head.");

  // The same two kernels with the problem as flat arguments, callable positionally: at decode sizes building the
  // struct through keywords and matching keyword arguments cost as much as the math (benchmarks/bench_dispatch.py).
  // The arguments keep their names for documentation and keyword calls; the order is the struct's.
  m.def(
      "lm_head_logprobs_small_cpu_fast",
      [](uintptr_t hidden, uintptr_t weight, uintptr_t bias, DType dtype, uintptr_t ids, int64_t n, int64_t v,
         int64_t h, int64_t stride_h, int64_t stride_w, float inv_t, bool with_entropy, uintptr_t logp, uintptr_t lse,
         uintptr_t entropy) {
        const LmHeadProblem problem{ptr<const void>(hidden), ptr<const void>(weight), ptr<const void>(bias), dtype,
                                    ptr<const int64_t>(ids), n, v, h, stride_h, stride_w, inv_t};
        return lm_head_logprobs_small_cpu(problem, with_entropy, ptr<float>(logp), ptr<float>(lse),
                                          ptr<float>(entropy));
      },
      py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("dtype"), py::arg("ids"), py::arg("n"),
      py::arg("v"), py::arg("h"), py::arg("stride_h"), py::arg("stride_w"), py::arg("inv_t"), py::arg("with_entropy"),
      py::arg("logp"), py::arg("lse"), py::arg("entropy"),
      "lm_head_logprobs_small_cpu with LmHeadProblem's fields as leading arguments (the decode hot path).");

  m.def(
      "lm_head_logprobs_small_backward_cpu_fast",
      [](uintptr_t hidden, uintptr_t weight, uintptr_t bias, DType dtype, uintptr_t ids, int64_t n, int64_t v,
         int64_t h, int64_t stride_h, int64_t stride_w, float inv_t, uintptr_t g, uintptr_t ge, uintptr_t lse,
         uintptr_t entropy, uintptr_t d_hidden, uintptr_t d_weight, uintptr_t d_bias) {
        const LmHeadProblem problem{ptr<const void>(hidden), ptr<const void>(weight), ptr<const void>(bias), dtype,
                                    ptr<const int64_t>(ids), n, v, h, stride_h, stride_w, inv_t};
        lm_head_logprobs_small_backward_cpu(problem, ptr<const float>(g), ptr<const float>(ge),
                                            ptr<const float>(lse), ptr<const float>(entropy), ptr<float>(d_hidden),
                                            ptr<float>(d_weight), ptr<float>(d_bias));
      },
      py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("dtype"), py::arg("ids"), py::arg("n"),
      py::arg("v"), py::arg("h"), py::arg("stride_h"), py::arg("stride_w"), py::arg("inv_t"), py::arg("g"),
      py::arg("ge"), py::arg("lse"), py::arg("entropy"), py::arg("d_hidden"), py::arg("d_weight"), py::arg("d_bias"),
      "lm_head_logprobs_small_backward_cpu with LmHeadProblem's fields as leading arguments (the hot path).");
  // Flat arguments, callable positionally: this runs once per loss call, where a struct built through keywords
  // would cost as much as the loop at decode sizes.
  m.def(
      "grpo_token_loss_grad_cpu",
      [](int64_t n, uintptr_t logp, uintptr_t entropy, uintptr_t weight, uintptr_t adv, uintptr_t old, uintptr_t ref,
         uintptr_t is_ratio, float beta, float epsilon_low, float epsilon_high, float delta, bool has_delta,
         float clamp, float entropy_coef, bool unbiased_kl, uintptr_t total, uintptr_t d_logp, uintptr_t d_entropy) {
        const TokenLossTerms terms{ptr<const float>(weight), ptr<const float>(adv), ptr<const float>(old),
                                   ptr<const float>(ref), ptr<const float>(is_ratio), beta, epsilon_low, epsilon_high,
                                   delta, has_delta, clamp, entropy_coef, unbiased_kl};
        grpo_token_loss_grad_cpu(n, ptr<float>(logp), ptr<float>(entropy), terms, ptr<float>(total), ptr<float>(d_logp),
                                 ptr<float>(d_entropy));
      },
      py::arg("n"), py::arg("logp"), py::arg("entropy"), py::arg("weight"), py::arg("adv"), py::arg("old"),
      py::arg("ref"), py::arg("is_ratio"), py::arg("beta"), py::arg("epsilon_low"), py::arg("epsilon_high"),
      py::arg("delta"), py::arg("has_delta"), py::arg("clamp"), py::arg("entropy_coef"), py::arg("unbiased_kl"),
      py::arg("total"), py::arg("d_logp"), py::arg("d_entropy"),
      "total = sum(weight * token_loss) (0-d) and weight * d token_loss / d logp [n] (and d_entropy [n] when "
      "entropy_coef != 0) of the GRPO loss, fp32 (0 for an absent old / ref / is_ratio / entropy); zero-weight "
      "tokens are left out and their logp / entropy set to 0 in place.");

  // The decode-sized fused loss: LmHeadProblem's fields, then TokenLossTerms', flat and positional like the above.
  m.def(
      "grpo_token_loss_fused_small_cpu",
      [](uintptr_t hidden, uintptr_t weight, uintptr_t bias, DType dtype, uintptr_t ids, int64_t n, int64_t v,
         int64_t h, int64_t stride_h, int64_t stride_w, float inv_t, uintptr_t token_weight, uintptr_t adv,
         uintptr_t old, uintptr_t ref, uintptr_t is_ratio, float beta, float epsilon_low, float epsilon_high,
         float delta, bool has_delta, float clamp, float entropy_coef, bool unbiased_kl, bool with_entropy,
         uintptr_t total, uintptr_t logp, uintptr_t entropy, uintptr_t d_hidden, uintptr_t d_weight,
         uintptr_t d_bias) {
        const LmHeadProblem problem{ptr<const void>(hidden), ptr<const void>(weight), ptr<const void>(bias), dtype,
                                    ptr<const int64_t>(ids), n, v, h, stride_h, stride_w, inv_t};
        const TokenLossTerms terms{ptr<const float>(token_weight), ptr<const float>(adv), ptr<const float>(old),
                                   ptr<const float>(ref), ptr<const float>(is_ratio), beta, epsilon_low, epsilon_high,
                                   delta, has_delta, clamp, entropy_coef, unbiased_kl};
        return grpo_token_loss_fused_small_cpu(problem, terms, with_entropy, ptr<float>(total), ptr<float>(logp),
                                               ptr<float>(entropy), ptr<float>(d_hidden), ptr<float>(d_weight),
                                               ptr<float>(d_bias));
      },
      py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("dtype"), py::arg("ids"), py::arg("n"),
      py::arg("v"), py::arg("h"), py::arg("stride_h"), py::arg("stride_w"), py::arg("inv_t"), py::arg("token_weight"),
      py::arg("adv"), py::arg("old"), py::arg("ref"), py::arg("is_ratio"), py::arg("beta"), py::arg("epsilon_low"),
      py::arg("epsilon_high"), py::arg("delta"), py::arg("has_delta"), py::arg("clamp"), py::arg("entropy_coef"),
      py::arg("unbiased_kl"), py::arg("with_entropy"), py::arg("total"), py::arg("logp"), py::arg("entropy"),
      py::arg("d_hidden"), py::arg("d_weight"), py::arg("d_bias"),
      "The fused GRPO loss of a decode-sized problem in one call: total (0-d), logp and entropy [n], fp32 gradients "
      "d_hidden [n, h], d_weight [v, h], d_bias [v] (0: none); False if an id is out of range.");
}

}  // namespace r1k
