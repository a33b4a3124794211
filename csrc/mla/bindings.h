#pragma once
#include <pybind11/pybind11.h>

namespace r1k {

// Registers the MLA family's functions and its MlaDecodeProblem struct on the module.
void register_mla(pybind11::module_& m);

}  // namespace r1k
