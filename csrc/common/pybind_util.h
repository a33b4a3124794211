#pragma once
// Helpers for the family binding files (csrc/<family>/bindings.cpp). Tensors travel from Python as raw
// addresses (tensor.data_ptr()), CUDA streams as integers (torch.cuda.current_stream().cuda_stream).
#include <pybind11/pybind11.h>

#include <cstdint>

namespace r1k {

template <typename T>
T* ptr(uintptr_t addr) {
  return reinterpret_cast<T*>(addr);
}

}  // namespace r1k
