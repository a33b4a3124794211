#pragma once
// The k-grouped FP8 weight gradient (MoE experts' dW) on AMX tiles in one call: the layout check, each expert's
// token range and every expert's product, where the Python path took a call and a tensor per step (at a decode
// step's one token per expert those cost more than the products; benchmarks/bench_dispatch.py).
#include <cstdint>

#include "fp8/gemm_small.h"

namespace r1k {

enum class GroupedWgradStatus : int { kOk = 0, kBadIds = 1, kNotContiguous = 2 };

// out [experts, p.m, p.n] fp32 dense: out[e] = (a * sa)[:, lo:hi] @ (b * sb)[:, lo:hi].T (+ c[e], same layout; null
// for none) over expert e's tokens lo:hi, from token_ranges_cpu with real_end (its last real token, rounded up to
// 16: the padding past it holds zeroed codes); 0 (or c[e]) for an expert without tokens. a [p.m, tokens] and
// b [p.n, tokens] e4m3 with row strides p.a_stride_m / p.b_stride_n, sa / sb their 1 x 128 row scales (p's scale
// strides), m_indices [tokens] in the contiguous layout of `segment`-row segments. Checks the ids first and
// returns kBadIds (contiguous_segments_cpu's rule) or kNotContiguous with nothing written. Only when
// amx_bf16_usable().
GroupedWgradStatus fp8_grouped_wgrad_amx_cpu(const uint8_t* a, const float* sa, const uint8_t* b, const float* sb,
                                             const float* c, float* out, const int32_t* m_indices, int64_t tokens,
                                             int64_t experts, int64_t segment, const Fp8GemmProblem& p);

}  // namespace r1k
