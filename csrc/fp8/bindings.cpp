// Python bindings of the FP8 family. Every argument is named (py::arg), geometry travels as a struct.
#include "fp8/bindings.h"

#include <stdexcept>
#include <string>

#include "common/pybind_util.h"
#include "fp8/quantize.h"

namespace py = pybind11;

namespace r1k {

void register_fp8(py::module_& m) {
  py::class_<TileGeometry>(m, "TileGeometry",
                           "A row-major [rows, cols] matrix cut into tile_rows x tile_cols tiles, one fp32 scale "
                           "per tile at scales[tile_r * scale_stride_r + tile_c * scale_stride_c] (strides in "
                           "elements).")
      .def(py::init([](int64_t rows, int64_t cols, int64_t row_stride, int64_t tile_rows, int64_t tile_cols,
                       int64_t scale_stride_r, int64_t scale_stride_c) {
             return TileGeometry{rows, cols, row_stride, tile_rows, tile_cols, scale_stride_r, scale_stride_c};
           }),
           py::kw_only(), py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("tile_rows"),
           py::arg("tile_cols"), py::arg("scale_stride_r"), py::arg("scale_stride_c"))
      .def_readonly("rows", &TileGeometry::rows)
      .def_readonly("cols", &TileGeometry::cols)
      .def_readonly("row_stride", &TileGeometry::row_stride)
      .def_readonly("tile_rows", &TileGeometry::tile_rows)
      .def_readonly("tile_cols", &TileGeometry::tile_cols)
      .def_readonly("scale_stride_r", &TileGeometry::scale_stride_r)
      .def_readonly("scale_stride_c", &TileGeometry::scale_stride_c);

  m.def(
      "quantize_fp8_tiles_cpu",
      [](uintptr_t x, DType dtype, const TileGeometry& geometry, uintptr_t out, uintptr_t scales, bool pow2) {
        py::gil_scoped_release release;
        quantize_fp8_tiles_cpu(ptr<const void>(x), dtype, geometry, ptr<uint8_t>(out), ptr<float>(scales), pow2);
      },
      py::kw_only(), py::arg("x"), py::arg("dtype"), py::arg("geometry"), py::arg("out"), py::arg("scales"),
      py::arg("pow2"), "Quantize a row-major matrix to FP8 E4M3 with one fp32 scale per tile (OpenMP).");

  m.def(
      "dequantize_fp8_tiles_cpu",
      [](uintptr_t q, uintptr_t scales, const TileGeometry& geometry, uintptr_t out, DType out_dtype) {
        if (out_dtype == DType::kFloat16) throw std::invalid_argument("out_dtype must be float32 or bfloat16");
        py::gil_scoped_release release;
        dequantize_fp8_tiles_cpu(ptr<const uint8_t>(q), ptr<const float>(scales), geometry, ptr<void>(out),
                                 out_dtype);
      },
      py::kw_only(), py::arg("q"), py::arg("scales"), py::arg("geometry"), py::arg("out"), py::arg("out_dtype"),
      "Dequantize FP8 E4M3 tiles to float32 or bfloat16.");

#if defined(R1K_WITH_CUDA)
  m.def(
      "quantize_fp8_groups_cuda",
      [](uintptr_t x, DType dtype, const TileGeometry& geometry, uintptr_t out, uintptr_t scales, bool pow2,
         uintptr_t stream) {
        const char* err = quantize_fp8_groups_cuda(ptr<const void>(x), dtype, geometry, ptr<uint8_t>(out),
                                                   ptr<float>(scales), pow2, ptr<void>(stream));
        if (err != nullptr) throw std::runtime_error(std::string("quantize_fp8_groups_cuda: ") + err);
      },
      py::kw_only(), py::arg("x"), py::arg("dtype"), py::arg("geometry"), py::arg("out"), py::arg("scales"),
      py::arg("pow2"), py::arg("stream"),
      "Per-token-group FP8 quantization on the GPU (geometry.tile_rows must be 1; stream: a cudaStream_t).");
#endif
}

}  // namespace r1k
