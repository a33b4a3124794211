// Python bindings of the MoE family. Every argument is named (py::arg); a routing problem travels as a struct.
#include "moe/bindings.h"

#include <stdexcept>
#include <string>

#include "common/pybind_util.h"
#include "moe/route.h"

namespace py = pybind11;

namespace r1k {

void register_moe(py::module_& m) {
  py::class_<RouteProblem>(m, "RouteProblem",
                           "A DeepSeek-V3 routing problem: tokens x experts logits, top_k of n_group groups' "
                           "best topk_group, weights renormalised (norm_topk_prob) and scaled.")
      .def(py::init([](int64_t tokens, int64_t experts, int64_t top_k, int64_t n_group, int64_t topk_group,
                       float routed_scaling_factor, bool norm_topk_prob, bool softmax) {
             return RouteProblem{tokens,      experts, top_k, n_group, topk_group, routed_scaling_factor,
                                 norm_topk_prob, softmax};
           }),
           py::kw_only(), py::arg("tokens"), py::arg("experts"), py::arg("top_k"), py::arg("n_group"),
           py::arg("topk_group"), py::arg("routed_scaling_factor"), py::arg("norm_topk_prob"), py::arg("softmax"))
      .def_readonly("tokens", &RouteProblem::tokens)
      .def_readonly("experts", &RouteProblem::experts)
      .def_readonly("top_k", &RouteProblem::top_k);

  m.def(
      "route_cpu",
      [](uintptr_t logits, DType dtype, uintptr_t bias, const RouteProblem& problem, uintptr_t weights,
         uintptr_t ids) {
        py::gil_scoped_release release;
        route_cpu(ptr<const void>(logits), dtype, ptr<const float>(bias), problem, ptr<float>(weights),
                  ptr<int32_t>(ids));
      },
      py::kw_only(), py::arg("logits"), py::arg("dtype"), py::arg("bias"), py::arg("problem"), py::arg("weights"),
      py::arg("ids"), "DeepSeek-V3 routing on the CPU (OpenMP over tokens); bias 0: none.");

#if defined(R1K_WITH_CUDA)
  m.def(
      "route_cuda",
      [](uintptr_t logits, DType dtype, uintptr_t bias, const RouteProblem& problem, uintptr_t weights,
         uintptr_t ids, uintptr_t stream) {
        const char* err = route_cuda(ptr<const void>(logits), dtype, ptr<const float>(bias), problem,
                                     ptr<float>(weights), ptr<int32_t>(ids), ptr<void>(stream));
        if (err != nullptr) throw std::runtime_error(std::string("route_cuda: ") + err);
      },
      py::kw_only(), py::arg("logits"), py::arg("dtype"), py::arg("bias"), py::arg("problem"), py::arg("weights"),
      py::arg("ids"), py::arg("stream"), "DeepSeek-V3 routing on the GPU (one warp per token; experts <= 512).");
#endif
}

}  // namespace r1k
