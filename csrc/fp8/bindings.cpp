// Python bindings of the FP8 family. Every argument is named (py::arg), geometry travels as a struct.
#include "fp8/bindings.h"

#include <stdexcept>
#include <string>

#include "common/pybind_util.h"
#include "fp8/gemm_amx.h"
#include "fp8/gemm_small.h"
#include "fp8/grouped_wgrad_amx.h"
#include "fp8/quantize.h"
#include "fp8/segments.h"

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

  py::class_<Fp8GemmProblem>(m, "Fp8GemmProblem",
                             "groups x ([m, k] x [n, k]) block-scaled FP8 products; b_tile_rows rows of b per "
                             "scale; strides in elements (_g: between groups / experts).")
      .def(py::init([](int64_t groups, int64_t m, int64_t n, int64_t k, int64_t b_tile_rows, int64_t a_stride_g,
                       int64_t a_stride_m, int64_t b_stride_g, int64_t b_stride_n, int64_t sa_stride_g,
                       int64_t sa_stride_m, int64_t sa_stride_k, int64_t sb_stride_g, int64_t sb_stride_n,
                       int64_t sb_stride_k, int64_t c_stride_m, int64_t out_stride_g, int64_t out_stride_m) {
             return Fp8GemmProblem{groups,      m,           n,           k,           b_tile_rows, a_stride_g,
                                   a_stride_m,  b_stride_g,  b_stride_n,  sa_stride_g, sa_stride_m, sa_stride_k,
                                   sb_stride_g, sb_stride_n, sb_stride_k, c_stride_m,  out_stride_g, out_stride_m};
           }),
           py::kw_only(), py::arg("groups"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("b_tile_rows"),
           py::arg("a_stride_g"), py::arg("a_stride_m"), py::arg("b_stride_g"), py::arg("b_stride_n"),
           py::arg("sa_stride_g"), py::arg("sa_stride_m"), py::arg("sa_stride_k"), py::arg("sb_stride_g"),
           py::arg("sb_stride_n"), py::arg("sb_stride_k"), py::arg("c_stride_m"), py::arg("out_stride_g"),
           py::arg("out_stride_m"));

  m.def(
      "contiguous_segments_cpu",
      [](uintptr_t m_indices, int64_t rows, int64_t experts, int64_t segment) {
        return contiguous_segments_cpu(ptr<const int32_t>(m_indices), rows, experts, segment);
      },
      py::arg("m_indices"), py::arg("rows"), py::arg("experts"), py::arg("segment"),  // positional too: per call
      "Real rows (id >= 0) of a contiguous grouped layout, or -1 when an id lies outside [-1, experts) or a "
      "segment mixes experts (each segment: its first row's expert, or -1).");

  m.def(
      "token_ranges_cpu",
      [](uintptr_t m_indices, int64_t rows, int64_t experts, int64_t segment, bool real_end, uintptr_t ranges) {
        return token_ranges_cpu(ptr<const int32_t>(m_indices), rows, experts, segment, real_end,
                                ptr<int32_t>(ranges));
      },
      py::kw_only(), py::arg("m_indices"), py::arg("rows"), py::arg("experts"), py::arg("segment"),
      py::arg("real_end"), py::arg("ranges"),
      "Each expert's (first row, end row) into ranges [experts, 2] int32, (0, 0) when absent, for ids that pass "
      "contiguous_segments_cpu (real_end: the end at the last real row + 1, rounded up to 16); False, nothing "
      "written, when an expert's segments are not contiguous.");

  m.def(
      "fp8_gemm_small_cpu",
      [](uintptr_t a, uintptr_t a_scales, uintptr_t b, uintptr_t b_scales, uintptr_t c, DType c_dtype, uintptr_t out,
         DType out_dtype, uintptr_t row_expert, uintptr_t masked_m, const Fp8GemmProblem& problem) {
        py::gil_scoped_release release;
        return fp8_gemm_small_cpu(ptr<const uint8_t>(a), ptr<const float>(a_scales), ptr<const uint8_t>(b),
                                  ptr<const float>(b_scales), ptr<const void>(c), c_dtype, ptr<void>(out), out_dtype,
                                  ptr<const int32_t>(row_expert), ptr<const int32_t>(masked_m), problem);
      },
      // positional calls allowed: the decode hot path, where matching eleven keywords costs a third of the call
      py::arg("a"), py::arg("a_scales"), py::arg("b"), py::arg("b_scales"), py::arg("c"), py::arg("c_dtype"),
      py::arg("out"), py::arg("out_dtype"), py::arg("row_expert"), py::arg("masked_m"), py::arg("problem"),
      "Few-row block-scaled FP8 GEMM on the CPU straight from the codes (c, row_expert, masked_m: 0 for none). "
      "False, with nothing written, when a masked_m entry lies outside [0, m].");

  m.def(
      "fp8_gemm_amx_cpu",
      [](uintptr_t a, uintptr_t a_scales, uintptr_t b, uintptr_t b_scales, uintptr_t c, DType c_dtype, uintptr_t out,
         DType out_dtype, const Fp8GemmProblem& problem) {
        py::gil_scoped_release release;
        fp8_gemm_amx_cpu(ptr<const uint8_t>(a), ptr<const float>(a_scales), ptr<const uint8_t>(b),
                         ptr<const float>(b_scales), ptr<const void>(c), c_dtype, ptr<void>(out), out_dtype, problem);
      },
      py::arg("a"), py::arg("a_scales"), py::arg("b"), py::arg("b_scales"), py::arg("c"), py::arg("c_dtype"),
      py::arg("out"), py::arg("out_dtype"), py::arg("problem"),  // positional calls allowed, as the few-row GEMM's
      "Block-scaled FP8 GEMM on AMX tiles (c: 0 for none; out and c float32 / bfloat16 with unit column stride; "
      "problem.groups 1); only where amx_bf16_usable().");

  py::enum_<GroupedWgradStatus>(m, "GroupedWgradStatus",
                                 "What fp8_grouped_wgrad_amx_cpu found wrong in m_indices (nothing written) or ok.")
      .value("ok", GroupedWgradStatus::kOk)
      .value("bad_ids", GroupedWgradStatus::kBadIds)
      .value("not_contiguous", GroupedWgradStatus::kNotContiguous);

  m.def(
      "fp8_grouped_wgrad_amx_cpu",
      [](uintptr_t a, uintptr_t a_scales, uintptr_t b, uintptr_t b_scales, uintptr_t c, uintptr_t out,
         uintptr_t m_indices, int64_t tokens, int64_t experts, int64_t segment, const Fp8GemmProblem& problem) {
        py::gil_scoped_release release;
        return fp8_grouped_wgrad_amx_cpu(ptr<const uint8_t>(a), ptr<const float>(a_scales), ptr<const uint8_t>(b),
                                         ptr<const float>(b_scales), ptr<const float>(c), ptr<float>(out),
                                         ptr<const int32_t>(m_indices), tokens, experts, segment, problem);
      },
      py::arg("a"), py::arg("a_scales"), py::arg("b"), py::arg("b_scales"), py::arg("c"), py::arg("out"),
      py::arg("m_indices"), py::arg("tokens"), py::arg("experts"), py::arg("segment"),
      py::arg("problem"),  // positional too: per call
      "The k-grouped FP8 weight gradient on AMX tiles in one call (out / c [experts, m, n] fp32 dense, c 0 for none; "
      "problem: one expert's m, n, row and scale strides); the m_indices status, nothing written unless ok.");

  m.def(
      "quantize_fp8_tiles_cpu",
      [](uintptr_t x, DType dtype, const TileGeometry& geometry, uintptr_t out, uintptr_t scales, bool pow2,
         uintptr_t m_indices) {
        py::gil_scoped_release release;
        quantize_fp8_tiles_cpu(ptr<const void>(x), dtype, geometry, ptr<uint8_t>(out), ptr<float>(scales), pow2,
                               ptr<const int32_t>(m_indices));
      },
      py::kw_only(), py::arg("x"), py::arg("dtype"), py::arg("geometry"), py::arg("out"), py::arg("scales"),
      py::arg("pow2"), py::arg("m_indices") = 0,
      "Quantize a row-major matrix to FP8 E4M3 with one fp32 scale per tile (OpenMP); rows whose m_indices entry "
      "is negative quantize as zeros.");

  m.def(
      "quantize_fp8_transposed_cpu",
      [](uintptr_t x, DType dtype, const TileGeometry& geometry, uintptr_t m_indices, uintptr_t out,
         int64_t out_stride, uintptr_t scales) {
        if (geometry.tile_cols != 1) throw std::invalid_argument("geometry.tile_cols must be 1");
        if (out_stride < geometry.rows) throw std::invalid_argument("out_stride must be at least geometry.rows");
        py::gil_scoped_release release;
        quantize_fp8_transposed_cpu(ptr<const void>(x), dtype, geometry, ptr<const int32_t>(m_indices),
                                    ptr<uint8_t>(out), out_stride, ptr<float>(scales));
      },
      py::kw_only(), py::arg("x"), py::arg("dtype"), py::arg("geometry"), py::arg("m_indices"), py::arg("out"),
      py::arg("out_stride"), py::arg("scales"),
      "x [rows, cols] -> x.T [cols, out_stride] in FP8 E4M3 (zero codes past rows), one fp32 scale per "
      "tile_rows x 1 tile of x; rows whose m_indices entry is negative (m_indices 0: none) quantize as zeros.");

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
