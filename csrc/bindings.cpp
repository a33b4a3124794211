// The one pybind11 module. Functions take raw addresses (tensor.data_ptr()) and sizes; Python has
// validated dtype, shape, device and contiguity before anything here runs (see r1kernels/_ext.py).
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "fp8/quantize.h"

namespace py = pybind11;
using r1k::DType;
using r1k::TileGeometry;

namespace {

template <typename T>
T* ptr(uintptr_t addr) {
  return reinterpret_cast<T*>(addr);
}

TileGeometry geometry(int64_t rows, int64_t cols, int64_t row_stride, int64_t tile_rows, int64_t tile_cols,
                      int64_t scale_stride_r, int64_t scale_stride_c) {
  return TileGeometry{rows, cols, row_stride, tile_rows, tile_cols, scale_stride_r, scale_stride_c};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "r1kernels C++/CUDA kernels (torch-free; called through r1kernels._ext)";
#if defined(R1K_WITH_CUDA)
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif

  m.def(
      "quantize_fp8_tiles_cpu",
      [](uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t row_stride, int64_t tile_rows,
         int64_t tile_cols, uintptr_t out, uintptr_t scales, int64_t ssr, int64_t ssc, bool pow2) {
        py::gil_scoped_release release;
        r1k::quantize_fp8_tiles_cpu(ptr<const void>(x), static_cast<DType>(dtype),
                                    geometry(rows, cols, row_stride, tile_rows, tile_cols, ssr, ssc),
                                    ptr<uint8_t>(out), ptr<float>(scales), pow2);
      },
      "Quantize a row-major [rows, cols] matrix to FP8 E4M3 with one fp32 scale per tile.");

  m.def(
      "dequantize_fp8_tiles_cpu",
      [](uintptr_t q, int64_t rows, int64_t cols, int64_t tile_rows, int64_t tile_cols, uintptr_t scales,
         int64_t ssr, int64_t ssc, uintptr_t out, int out_dtype) {
        py::gil_scoped_release release;
        r1k::dequantize_fp8_tiles_cpu(ptr<const uint8_t>(q), ptr<const float>(scales),
                                      geometry(rows, cols, cols, tile_rows, tile_cols, ssr, ssc), ptr<void>(out),
                                      static_cast<DType>(out_dtype));
      },
      "Dequantize FP8 E4M3 tiles to float32 (out_dtype 0) or bfloat16 (out_dtype 2).");

#if defined(R1K_WITH_CUDA)
  m.def(
      "quantize_fp8_groups_cuda",
      [](uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t row_stride, int64_t group, uintptr_t out,
         uintptr_t scales, int64_t ssr, int64_t ssc, bool pow2, uintptr_t stream) {
        const char* err = r1k::quantize_fp8_groups_cuda(
            ptr<const void>(x), static_cast<DType>(dtype), geometry(rows, cols, row_stride, 1, group, ssr, ssc),
            ptr<uint8_t>(out), ptr<float>(scales), pow2, ptr<void>(stream));
        if (err != nullptr) throw std::runtime_error(std::string("quantize_fp8_groups_cuda: ") + err);
      },
      "Per-token-group FP8 quantization on the GPU (stream = torch.cuda.current_stream().cuda_stream).");
#endif
}
