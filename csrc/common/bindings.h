#pragma once
#include <pybind11/pybind11.h>

namespace r1k {

// Registers the building blocks shared by the families (the AMX bf16 GEMM) on the module.
void register_common(pybind11::module_& m);

}  // namespace r1k
