// The one pybind11 module. It exports what every family shares (DType, whether CUDA was built) and lets
// each family register its own functions (csrc/<family>/bindings.cpp). Functions take raw addresses
// (tensor.data_ptr()) and named arguments; Python has validated dtype, shape, device and contiguity first.
#include <pybind11/pybind11.h>

#include "common/bindings.h"
#include "common/dtype.h"
#include "fp8/bindings.h"
#include "grpo/bindings.h"
#include "mla/bindings.h"
#include "moe/bindings.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "r1kernels C++/CUDA kernels (torch-free; called through r1kernels._ext)";
#if defined(R1K_WITH_CUDA)
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  py::enum_<r1k::DType>(m, "DType", "Element types of the kernels' inputs and outputs.")
      .value("float32", r1k::DType::kFloat32)
      .value("float16", r1k::DType::kFloat16)
      .value("bfloat16", r1k::DType::kBFloat16);

  r1k::register_common(m);
  r1k::register_fp8(m);
  r1k::register_grpo(m);
  r1k::register_moe(m);
  r1k::register_mla(m);
}
