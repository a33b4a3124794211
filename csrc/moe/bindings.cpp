// Python bindings of the MoE family. Every argument is named (py::arg); a routing problem travels as a struct.
#include "moe/bindings.h"

#include <stdexcept>
#include <string>

#include "common/pybind_util.h"
#include "moe/grouped_linear_small.h"
#include "moe/permutation.h"
#include "moe/route.h"
#include "moe/rows.h"

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

  py::class_<PermutationProblem>(m, "PermutationProblem",
                                 "slots (tokens x top_k) routed to experts; segments aligned to `align` rows; "
                                 "row-indexed outputs have `rows` rows.")
      .def(py::init([](int64_t slots, int64_t experts, int64_t align, int64_t rows) {
             return PermutationProblem{slots, experts, align, rows};
           }),
           py::kw_only(), py::arg("slots"), py::arg("experts"), py::arg("align"), py::arg("rows"))
      .def_readonly("slots", &PermutationProblem::slots)
      .def_readonly("experts", &PermutationProblem::experts)
      .def_readonly("align", &PermutationProblem::align)
      .def_readonly("rows", &PermutationProblem::rows);

  m.def(
      "permutation_index_cpu",
      [](uintptr_t expert_ids, const PermutationProblem& problem, uintptr_t counts, uintptr_t offsets,
         uintptr_t row_of, uintptr_t source, uintptr_t row_expert) {
        py::gil_scoped_release release;
        return permutation_index_cpu(ptr<const int32_t>(expert_ids), problem, ptr<int32_t>(counts), ptr<int64_t>(offsets),
                              ptr<int32_t>(row_of), ptr<int32_t>(source), ptr<int32_t>(row_expert));
      },
      py::kw_only(), py::arg("expert_ids"), py::arg("problem"), py::arg("counts"), py::arg("offsets"),
      py::arg("row_of"), py::arg("source"), py::arg("row_expert"),
      "MoE permutation index on the CPU (stable counting sort, OpenMP). Returns the aligned total of rows "
      "(offsets[experts]; rows past problem.rows are not written), or -1, with nothing written, when an expert id "
      "lies outside [-1, experts).");

  py::class_<RowsProblem>(m, "RowsProblem",
                          "rows R of the expert-sorted layout, tokens T with top_k slots each, hidden H elements "
                          "per row; row_stride: elements between rows of the strided input.")
      .def(py::init([](int64_t rows, int64_t tokens, int64_t top_k, int64_t hidden, int64_t row_stride) {
             return RowsProblem{rows, tokens, top_k, hidden, row_stride};
           }),
           py::kw_only(), py::arg("rows"), py::arg("tokens"), py::arg("top_k"), py::arg("hidden"),
           py::arg("row_stride"));

  m.def(
      "gather_rows_cpu",
      [](uintptr_t x, uintptr_t slots, uintptr_t weights, uintptr_t out, const RowsProblem& problem, DType dtype,
         int64_t elem_bytes) {
        py::gil_scoped_release release;
        gather_rows_cpu(ptr<const void>(x), ptr<const int32_t>(slots), ptr<const float>(weights), ptr<void>(out),
                        problem, dtype, elem_bytes);
      },
      py::kw_only(), py::arg("x"), py::arg("slots"), py::arg("weights"), py::arg("out"), py::arg("problem"),
      py::arg("dtype"), py::arg("elem_bytes"), "MoE row gather on the CPU (weights 0: none).");
  m.def(
      "combine_rows_cpu",
      [](uintptr_t y, uintptr_t row_of, uintptr_t weights, uintptr_t out, const RowsProblem& problem, DType dtype) {
        py::gil_scoped_release release;
        combine_rows_cpu(ptr<const void>(y), ptr<const int32_t>(row_of), ptr<const float>(weights), ptr<void>(out),
                         problem, dtype);
      },
      py::kw_only(), py::arg("y"), py::arg("row_of"), py::arg("weights"), py::arg("out"), py::arg("problem"),
      py::arg("dtype"), "MoE weighted row combine on the CPU (weights 0: all ones).");
  m.def(
      "row_dot_cpu",
      [](uintptr_t d, DType d_dtype, uintptr_t y, DType y_dtype, uintptr_t row_of, uintptr_t out,
         const RowsProblem& problem) {
        py::gil_scoped_release release;
        row_dot_cpu(ptr<const void>(d), d_dtype, ptr<const void>(y), y_dtype, ptr<const int32_t>(row_of),
                    ptr<float>(out), problem);
      },
      py::kw_only(), py::arg("d"), py::arg("d_dtype"), py::arg("y"), py::arg("y_dtype"), py::arg("row_of"),
      py::arg("out"), py::arg("problem"), "Per-slot dot products <d[t], y[row_of[t, j]]> on the CPU.");

  py::class_<GroupedLinearProblem>(m, "GroupedLinearProblem",
                                   "x [rows, k] through weight [experts, n, k], one expert per row.")
      .def(py::init([](int64_t rows, int64_t n, int64_t k) { return GroupedLinearProblem{rows, n, k}; }),
           py::kw_only(), py::arg("rows"), py::arg("n"), py::arg("k"));
  m.def(
      "grouped_linear_small_cpu",
      [](uintptr_t x, uintptr_t weight, uintptr_t row_expert, uintptr_t out, DType dtype,
         const GroupedLinearProblem& problem) {
        py::gil_scoped_release release;
        grouped_linear_small_cpu(ptr<const void>(x), ptr<const void>(weight), ptr<const int32_t>(row_expert),
                                 ptr<void>(out), dtype, problem);
      },
      // positional calls allowed: the decode hot path
      py::arg("x"), py::arg("weight"), py::arg("row_expert"), py::arg("out"), py::arg("dtype"), py::arg("problem"),
      "Few-row MoE expert linear on the CPU (out[r] = x[r] @ weight[row_expert[r]].T).");

#if defined(R1K_WITH_CUDA)
  m.def("permutation_index_workspace_cuda", &permutation_index_workspace_cuda, py::kw_only(), py::arg("problem"),
        "Scratch bytes permutation_index_cuda needs.");
  m.def(
      "permutation_index_cuda",
      [](uintptr_t expert_ids, const PermutationProblem& problem, uintptr_t counts, uintptr_t offsets,
         uintptr_t row_of, uintptr_t source, uintptr_t row_expert, uintptr_t workspace, int64_t workspace_bytes,
         uintptr_t stream) {
        const char* err = permutation_index_cuda(ptr<const int32_t>(expert_ids), problem, ptr<int32_t>(counts),
                                                 ptr<int64_t>(offsets), ptr<int32_t>(row_of), ptr<int32_t>(source),
                                                 ptr<int32_t>(row_expert), ptr<void>(workspace), workspace_bytes,
                                                 ptr<void>(stream));
        if (err != nullptr) throw std::runtime_error(std::string("permutation_index_cuda: ") + err);
      },
      py::kw_only(), py::arg("expert_ids"), py::arg("problem"), py::arg("counts"), py::arg("offsets"),
      py::arg("row_of"), py::arg("source"), py::arg("row_expert"), py::arg("workspace"), py::arg("workspace_bytes"),
      py::arg("stream"), "MoE permutation index on the GPU (CUB radix sort; no host synchronisation).");
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
