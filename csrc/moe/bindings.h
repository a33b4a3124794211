#pragma once
#include <pybind11/pybind11.h>

namespace r1k {

// Registers the MoE family's functions and its RouteProblem struct on the module.
void register_moe(pybind11::module_& m);

}  // namespace r1k
