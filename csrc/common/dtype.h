#pragma once
// Element types the kernels read and write, shared by every family and exported to Python by the module
// (r1kernels._C.DType), so Python never mirrors them as integers.
namespace r1k {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace r1k
