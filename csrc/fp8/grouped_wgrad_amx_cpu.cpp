// The k-grouped FP8 weight gradient on AMX tiles (see grouped_wgrad_amx.h): each expert's product is the dense AMX
// GEMM on its token range, read in place through offset pointers.
#include "fp8/grouped_wgrad_amx.h"

#include <algorithm>
#include <cstddef>
#include <vector>

#include "fp8/gemm_amx.h"
#include "fp8/segments.h"

namespace r1k {

GroupedWgradStatus fp8_grouped_wgrad_amx_cpu(const uint8_t* a, const float* sa, const uint8_t* b, const float* sb,
                                             const float* c, float* out, const int32_t* m_indices, int64_t tokens,
                                             int64_t experts, int64_t segment, const Fp8GemmProblem& p) {
  constexpr int64_t kScaleBlock = 128;  // tokens per scale
  if (contiguous_segments_cpu(m_indices, tokens, experts, segment) < 0) return GroupedWgradStatus::kBadIds;
  std::vector<int32_t> ranges(static_cast<size_t>(2 * experts));
  if (!token_ranges_cpu(m_indices, tokens, experts, segment, true, ranges.data()))
    return GroupedWgradStatus::kNotContiguous;
  const int64_t per_expert = p.m * p.n;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t lo = ranges[2 * e], hi = ranges[2 * e + 1];
    float* o = out + e * per_expert;
    const float* ce = c != nullptr ? c + e * per_expert : nullptr;
    if (hi <= lo) {  // no tokens: c, or zeros
      if (ce != nullptr)
        std::copy(ce, ce + per_expert, o);
      else
        std::fill(o, o + per_expert, 0.0f);
      continue;
    }
    Fp8GemmProblem q = p;
    q.k = hi - lo;
    const int64_t kb = lo / kScaleBlock;  // lo starts a segment: a whole scale block
    fp8_gemm_amx_cpu(a + lo, sa + kb * p.sa_stride_k, b + lo, sb + kb * p.sb_stride_k, ce, DType::kFloat32, o,
                     DType::kFloat32, q);
  }
  return GroupedWgradStatus::kOk;
}

}  // namespace r1k
