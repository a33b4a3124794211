#pragma once
#include <pybind11/pybind11.h>

namespace r1k {

// Registers the FP8 family's functions and its TileGeometry struct on the module.
void register_fp8(pybind11::module_& m);

}  // namespace r1k
