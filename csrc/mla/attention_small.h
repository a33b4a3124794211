#pragma once
// MLA training attention (forward) of small problems on the CPU, in one call: at these sizes the blocked PyTorch
// path's few dozen ops cost far more than the math (r1kernels/mla/attention.py picks this below a multiply-add
// budget; larger problems keep the blocked path, whose products run on oneDNN / MKL).
#include <cstdint>

#include "common/dtype.h"

namespace r1k {

// q [batch, seq, heads, dn + dr], k_nope [batch, seq, heads, dn], k_pe [batch, seq, dr] (one rope key per position
// for every head), v [batch, seq, heads, dv]: element strides of the first dimensions, the last one dense.
struct MlaAttentionProblem {
  int64_t batch, seq, heads, dn, dr, dv;
  int64_t q_stride[3], kn_stride[3], kp_stride[2], v_stride[3];
  float scale;
  bool causal;
};

// out [batch, seq, heads, dv] (dense, of `dtype`), lse [batch, heads, seq] fp32: softmax((q_nope . k_nope + q_pe .
// k_pe) * scale) v per head in fp32. With cu_seqlens (num_seqs + 1 int32 offsets; batch 1) the sequences are
// packed along seq; returns false, writing nothing, when they do not rise from 0 to seq.
bool mla_attention_small_cpu(const void* q, const void* k_nope, const void* k_pe, const void* v, DType dtype,
                             const int32_t* cu_seqlens, int64_t num_seqs, void* out, float* lse,
                             const MlaAttentionProblem& p);

}  // namespace r1k
