#pragma once
#include <pybind11/pybind11.h>

namespace r1k {

// Registers the GRPO family's functions and its LmHeadProblem struct on the module.
void register_grpo(pybind11::module_& m);

}  // namespace r1k
