// Python bindings of the GRPO family. Every argument is named (py::arg); the problem travels as a struct.
#include "grpo/bindings.h"

#include "common/pybind_util.h"
#include "grpo/lm_head_small.h"

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
}

}  // namespace r1k
