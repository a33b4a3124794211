// Python bindings of the shared CPU building blocks. Named arguments, raw addresses (see csrc/bindings.cpp).
#include "common/bindings.h"

#include <stdexcept>

#include "common/amx_bf16_gemm.h"
#include "common/pybind_util.h"

namespace py = pybind11;

namespace r1k {

void register_common(py::module_& m) {
  m.def("amx_bf16_usable", &amx_bf16_usable,
        "Whether this process can run AMX-BF16 tiles (CPU flags and the OS's tile-data permission, asked once).");
  m.def("amx_packed_b_words", &amx_packed_b_words, py::kw_only(), py::arg("n"), py::arg("k"),
        "32-bit words of a [n, k] bf16 matrix packed by amx_pack_b_nt.");
  m.def(
      "amx_pack_b_nt",
      [](uintptr_t b, int64_t ldb, int64_t n, int64_t k, uintptr_t packed) {
        py::gil_scoped_release release;
        amx_pack_b_nt(ptr<const uint16_t>(b), ldb, n, k, ptr<uint32_t>(packed));
      },
      py::kw_only(), py::arg("b"), py::arg("ldb"), py::arg("n"), py::arg("k"), py::arg("packed"),
      "Pack b [n, k] bf16 (row stride ldb) as the right operand of amx_bf16_gemm_nt.");
  m.def(
      "amx_bf16_gemm_nt",
      [](uintptr_t a, int64_t lda, int64_t m_rows, uintptr_t packed_b, int64_t n, int64_t k, uintptr_t bias,
         float alpha, uintptr_t c, int64_t ldc) {
        if (!amx_bf16_usable()) throw std::runtime_error("AMX-BF16 is not usable in this process");
        py::gil_scoped_release release;
        amx_bf16_gemm_nt(ptr<const uint16_t>(a), lda, m_rows, ptr<const uint32_t>(packed_b), n, k,
                         ptr<const float>(bias), alpha, ptr<float>(c), ldc);
      },
      py::kw_only(), py::arg("a"), py::arg("lda"), py::arg("m"), py::arg("packed_b"), py::arg("n"), py::arg("k"),
      py::arg("bias"), py::arg("alpha"), py::arg("c"), py::arg("ldc"),
      "c [m, n] fp32 = alpha * (a [m, k] bf16 @ b^T + bias [n] fp32 (0: none)) on AMX tiles, b packed by "
      "amx_pack_b_nt.");
}

}  // namespace r1k
