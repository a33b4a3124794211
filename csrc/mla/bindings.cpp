// Python bindings of the MLA family. Every argument is named (py::arg); a decode problem travels as a struct.
#include "mla/bindings.h"

#include "common/pybind_util.h"
#include "mla/decode.h"

namespace py = pybind11;

namespace r1k {

void register_mla(py::module_& m) {
  py::class_<MlaDecodeProblem>(m, "MlaDecodeProblem",
                               "batch x s_q x heads absorbed queries over a paged cache of num_blocks pages of "
                               "`page` keys, block tables max_blocks wide.")
      .def(py::init([](int64_t batch, int64_t s_q, int64_t heads, int64_t page, int64_t max_blocks,
                       int64_t num_blocks, float scale, bool causal) {
             return MlaDecodeProblem{batch, s_q, heads, page, max_blocks, num_blocks, scale, causal};
           }),
           py::kw_only(), py::arg("batch"), py::arg("s_q"), py::arg("heads"), py::arg("page"), py::arg("max_blocks"),
           py::arg("num_blocks"), py::arg("scale"), py::arg("causal"));

  py::enum_<MlaDecodeStatus>(m, "MlaDecodeStatus", "What mla_decode_cpu found wrong (nothing written) or kOk.")
      .value("ok", MlaDecodeStatus::kOk)
      .value("bad_length", MlaDecodeStatus::kBadLength)
      .value("bad_block", MlaDecodeStatus::kBadBlock);

  m.def(
      "mla_decode_cpu",
      [](uintptr_t q, uintptr_t kv_cache, DType dtype, uintptr_t block_table, uintptr_t cache_seqlens, uintptr_t out,
         uintptr_t lse, const MlaDecodeProblem& problem) {
        py::gil_scoped_release release;
        return mla_decode_cpu(ptr<const void>(q), ptr<const void>(kv_cache), dtype, ptr<const int32_t>(block_table),
                              ptr<const int32_t>(cache_seqlens), ptr<void>(out), ptr<float>(lse), problem);
      },
      py::kw_only(), py::arg("q"), py::arg("kv_cache"), py::arg("dtype"), py::arg("block_table"),
      py::arg("cache_seqlens"), py::arg("out"), py::arg("lse"), py::arg("problem"),
      "Absorbed-MLA decode over a paged latent cache on the CPU (online softmax, fp32).");
}

}  // namespace r1k
