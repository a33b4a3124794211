// Python bindings of the MLA family. Every argument is named (py::arg); a problem travels as a struct.
#include "mla/bindings.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <array>

#include "common/pybind_util.h"
#include "mla/append.h"
#include "mla/attention_small.h"
#include "mla/decode.h"

namespace py = pybind11;

namespace r1k {

void register_mla(py::module_& m) {
  py::class_<MlaDecodeProblem>(m, "MlaDecodeProblem",
                               "batch x s_q x heads absorbed queries over a paged cache of num_blocks pages of "
                               "`page` keys, block tables max_blocks wide.")
      .def(py::init([](int64_t batch, int64_t s_q, int64_t heads, int64_t page, int64_t max_blocks,
                       int64_t num_blocks, float scale, bool causal) {
             return MlaDecodeProblem{batch, s_q, heads, page, max_blocks, num_blocks, scale, causal};
           }),
           py::kw_only(), py::arg("batch"), py::arg("s_q"), py::arg("heads"), py::arg("page"), py::arg("max_blocks"),
           py::arg("num_blocks"), py::arg("scale"), py::arg("causal"));

  py::enum_<MlaDecodeStatus>(m, "MlaDecodeStatus", "What mla_decode_cpu found wrong (nothing written) or kOk.")
      .value("ok", MlaDecodeStatus::kOk)
      .value("bad_length", MlaDecodeStatus::kBadLength)
      .value("bad_block", MlaDecodeStatus::kBadBlock);

  m.def(
      "mla_decode_cpu",
      [](uintptr_t q, uintptr_t kv_cache, DType dtype, uintptr_t block_table, uintptr_t cache_seqlens, uintptr_t out,
         uintptr_t lse, const MlaDecodeProblem& problem) {
        py::gil_scoped_release release;
        return mla_decode_cpu(ptr<const void>(q), ptr<const void>(kv_cache), dtype, ptr<const int32_t>(block_table),
                              ptr<const int32_t>(cache_seqlens), ptr<void>(out), ptr<float>(lse), problem);
      },
      py::arg("q"), py::arg("kv_cache"), py::arg("dtype"), py::arg("block_table"),  // positional too: per step
      py::arg("cache_seqlens"), py::arg("out"), py::arg("lse"), py::arg("problem"),
      "Absorbed-MLA decode over a paged latent cache on the CPU (online softmax, fp32).");

  m.def(
      "mla_append_cpu",
      [](uintptr_t kv_cache, int64_t elt, uintptr_t block_table, uintptr_t lengths, uintptr_t latents,
         uintptr_t new_lengths, int64_t batch, int64_t s_new, int64_t width, int64_t page, int64_t max_blocks,
         int64_t num_blocks) {
        return mla_append_cpu(ptr<void>(kv_cache), elt, ptr<const int32_t>(block_table), ptr<const int32_t>(lengths),
                              ptr<const void>(latents), ptr<int32_t>(new_lengths), batch, s_new, width, page,
                              max_blocks, num_blocks);
      },
      py::arg("kv_cache"), py::arg("elt"), py::arg("block_table"), py::arg("lengths"), py::arg("latents"),
      py::arg("new_lengths"), py::arg("batch"), py::arg("s_new"), py::arg("width"), py::arg("page"),
      py::arg("max_blocks"), py::arg("num_blocks"),  // positional too: per decode step and layer
      "Append latents [batch, s_new, width] (dense, elt-byte elements) to the paged cache after each sequence's "
      "length; new_lengths = lengths + s_new. A status, nothing written unless ok.");

  py::class_<MlaAttentionProblem>(m, "MlaAttentionProblem",
                                  "q [batch, seq, heads, dn + dr], k_nope [.., dn], k_pe [batch, seq, dr], v [.., "
                                  "dv]: sizes, then the element strides of q, k_nope, v (batch, seq, head) and k_pe "
                                  "(batch, seq).")
      .def(py::init([](int64_t batch, int64_t seq, int64_t heads, int64_t dn, int64_t dr, int64_t dv,
                       std::array<int64_t, 3> q_stride, std::array<int64_t, 3> kn_stride,
                       std::array<int64_t, 2> kp_stride, std::array<int64_t, 3> v_stride, float scale, bool causal) {
             MlaAttentionProblem p{batch, seq, heads, dn, dr, dv, {}, {}, {}, {}, scale, causal};
             std::copy(q_stride.begin(), q_stride.end(), p.q_stride);
             std::copy(kn_stride.begin(), kn_stride.end(), p.kn_stride);
             std::copy(kp_stride.begin(), kp_stride.end(), p.kp_stride);
             std::copy(v_stride.begin(), v_stride.end(), p.v_stride);
             return p;
           }),
           py::kw_only(), py::arg("batch"), py::arg("seq"), py::arg("heads"), py::arg("dn"), py::arg("dr"),
           py::arg("dv"), py::arg("q_stride"), py::arg("kn_stride"), py::arg("kp_stride"), py::arg("v_stride"),
           py::arg("scale"), py::arg("causal"));

  m.def(
      "mla_attention_small_cpu",
      [](uintptr_t q, uintptr_t k_nope, uintptr_t k_pe, uintptr_t v, DType dtype, uintptr_t cu_seqlens,
         int64_t num_seqs, uintptr_t out, uintptr_t lse, const MlaAttentionProblem& problem) {
        return mla_attention_small_cpu(ptr<const void>(q), ptr<const void>(k_nope), ptr<const void>(k_pe),
                                       ptr<const void>(v), dtype, ptr<const int32_t>(cu_seqlens), num_seqs,
                                       ptr<void>(out), ptr<float>(lse), problem);
      },
      py::arg("q"), py::arg("k_nope"), py::arg("k_pe"), py::arg("v"), py::arg("dtype"), py::arg("cu_seqlens"),
      py::arg("num_seqs"), py::arg("out"), py::arg("lse"), py::arg("problem"),
      "Small MLA attention forward on the CPU (fp32 math; cu_seqlens 0 for none); False, nothing written, when "
      "cu_seqlens does not rise from 0 to seq.");
}

}  // namespace r1k
