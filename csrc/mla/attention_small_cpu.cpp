// Small MLA attention forward on the CPU (see attention_small.h). Per (sequence, head): the keys and values in
// fp32 once, then per query its scores, a softmax over its visible keys and the weighted value sum, all fp32.
#include "mla/attention_small.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu_vector.h"
#include "common/host_device.h"

namespace r1k {
namespace {

float load(const void* base, DType dtype, int64_t i) {
  if (dtype == DType::kFloat32) return static_cast<const float*>(base)[i];
  const uint16_t v = static_cast<const uint16_t*>(base)[i];
  return dtype == DType::kBFloat16 ? bf16_to_float(v) : fp16_to_float(v);
}

void load_row(const void* base, DType dtype, int64_t offset, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = load(base, dtype, offset + i);
}

void store(float x, DType dtype, void* base, int64_t i) {
  if (dtype == DType::kFloat32) {
    static_cast<float*>(base)[i] = x;
    return;
  }
  static_cast<uint16_t*>(base)[i] = dtype == DType::kBFloat16 ? float_to_bf16_rne(x) : float_to_fp16_rne(x);
}

// Rows lo:hi of batch b, head h: keys [len, dn + dr] (the shared rope key beside each head's own), values [len, dv].
void attend(const void* q, const void* kn, const void* kp, const void* v, DType dtype, void* out, float* lse,
            const MlaAttentionProblem& p, int64_t b, int64_t h, int64_t lo, int64_t hi) {
  const int64_t len = hi - lo, d = p.dn + p.dr;
  std::vector<float> keys(static_cast<size_t>(len * d)), values(static_cast<size_t>(len * p.dv));
  std::vector<float> row(static_cast<size_t>(d)), w(static_cast<size_t>(len)), acc(static_cast<size_t>(p.dv));
  for (int64_t j = 0; j < len; ++j) {
    const int64_t s = lo + j;
    load_row(kn, dtype, b * p.kn_stride[0] + s * p.kn_stride[1] + h * p.kn_stride[2], p.dn, &keys[j * d]);
    load_row(kp, dtype, b * p.kp_stride[0] + s * p.kp_stride[1], p.dr, &keys[j * d + p.dn]);
    load_row(v, dtype, b * p.v_stride[0] + s * p.v_stride[1] + h * p.v_stride[2], p.dv, &values[j * p.dv]);
  }
  for (int64_t i = 0; i < len; ++i) {
    const int64_t s = lo + i, seen = p.causal ? i + 1 : len;  // a query always sees itself: no empty rows
    load_row(q, dtype, b * p.q_stride[0] + s * p.q_stride[1] + h * p.q_stride[2], d, row.data());
    float m = -INFINITY;
    for (int64_t j = 0; j < seen; ++j) {
      w[j] = dot8(row.data(), &keys[j * d], d) * p.scale;
      m = std::max(m, w[j]);
    }
    float sum = 0.0f;
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t j = 0; j < seen; ++j) {
      const float e = std::exp(w[j] - m);
      sum += e;
      const float* vj = &values[j * p.dv];
      for (int64_t c = 0; c < p.dv; ++c) acc[c] += e * vj[c];
    }
    const int64_t o = ((b * p.seq + s) * p.heads + h) * p.dv;
    for (int64_t c = 0; c < p.dv; ++c) store(acc[c] / sum, dtype, out, o + c);
    lse[(b * p.heads + h) * p.seq + s] = m + std::log(sum);
  }
}

}  // namespace

bool mla_attention_small_cpu(const void* q, const void* k_nope, const void* k_pe, const void* v, DType dtype,
                             const int32_t* cu_seqlens, int64_t num_seqs, void* out, float* lse,
                             const MlaAttentionProblem& p) {
  if (cu_seqlens) {  // checked before anything is written
    if (cu_seqlens[0] != 0 || cu_seqlens[num_seqs] != p.seq) return false;
    for (int64_t i = 0; i < num_seqs; ++i)
      if (cu_seqlens[i + 1] < cu_seqlens[i]) return false;
  }
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.heads; ++h) {
      if (!cu_seqlens) {
        attend(q, k_nope, k_pe, v, dtype, out, lse, p, b, h, 0, p.seq);
        continue;
      }
      for (int64_t i = 0; i < num_seqs; ++i)
        attend(q, k_nope, k_pe, v, dtype, out, lse, p, b, h, cu_seqlens[i], cu_seqlens[i + 1]);
    }
  return true;
}

}  // namespace r1k
