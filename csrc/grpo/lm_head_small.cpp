// Decode-sized LM-head log-probs on the CPU (see lm_head_small.h): straight loops, fp32 accumulation.
#include "grpo/lm_head_small.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu_isa.h"
#include "common/cpu_vector.h"
#include "common/host_device.h"

namespace r1k {
namespace {

// Row i of a [rows, h] matrix of `dtype` converted to fp32.
__attribute__((always_inline)) inline void load_row(const void* base, DType dtype, int64_t stride, int64_t i, int64_t h,
                                                     float* out) {
  if (dtype == DType::kFloat32) {
    const float* p = static_cast<const float*>(base) + i * stride;
    std::copy(p, p + h, out);
    return;
  }
  const uint16_t* p = static_cast<const uint16_t*>(base) + i * stride;
  for (int64_t k = 0; k < h; ++k) out[k] = dtype == DType::kBFloat16 ? bf16_to_float(p[k]) : fp16_to_float(p[k]);
}

float load_one(const void* base, DType dtype, int64_t i) {
  if (dtype == DType::kFloat32) return static_cast<const float*>(base)[i];
  const uint16_t v = static_cast<const uint16_t*>(base)[i];
  return dtype == DType::kBFloat16 ? bf16_to_float(v) : fp16_to_float(v);
}

// The weight (and bias) as fp32: the caller's memory for fp32 inputs, else converted once per call.
struct Fp32Operands {
  std::vector<float> w_copy, b_copy;
  const float* w;
  int64_t w_stride;
  const float* b;
  explicit Fp32Operands(const LmHeadProblem& p) {
    if (p.dtype == DType::kFloat32) {
      w = static_cast<const float*>(p.weight);
      w_stride = p.stride_w;
    } else {
      w_copy.resize(static_cast<size_t>(p.v * p.h));
      for (int64_t j = 0; j < p.v; ++j) load_row(p.weight, p.dtype, p.stride_w, j, p.h, w_copy.data() + j * p.h);
      w = w_copy.data();
      w_stride = p.h;
    }
    if (p.bias != nullptr && p.dtype == DType::kFloat32) {
      b = static_cast<const float*>(p.bias);
    } else if (p.bias != nullptr) {
      b_copy.resize(static_cast<size_t>(p.v));
      for (int64_t j = 0; j < p.v; ++j) b_copy[j] = load_one(p.bias, p.dtype, j);
      b = b_copy.data();
    } else {
      b = nullptr;
    }
  }
  const float* row(int64_t j) const { return w + j * w_stride; }
};

// A row of hidden and one of logits in fp32, kept per thread: at decode sizes their allocations were a visible share
// of the call.
struct Scratch {
  std::vector<float> hrow, z;
};

inline Scratch& thread_scratch(const LmHeadProblem& p, bool with_logits_row) {
  static thread_local Scratch scratch;
  if (scratch.hrow.size() < static_cast<size_t>(p.h)) scratch.hrow.resize(static_cast<size_t>(p.h));
  if (with_logits_row && scratch.z.size() < static_cast<size_t>(p.v)) scratch.z.resize(static_cast<size_t>(p.v));
  return scratch;
}

// z[v] of row i, and its max. Four weight rows at a time (dot8_rows4: independent chains of adds, where one dot
// is a chain of h / 8 dependent adds), the rest one by one, each with dot8's lanes and order.
__attribute__((always_inline)) inline float logits_row(const LmHeadProblem& p, const Fp32Operands& ops,
                                                       const float* hrow, float* z) {
  int64_t j = 0;
  for (; j + 4 <= p.v; j += 4) {
    const float* const rows[4] = {ops.row(j), ops.row(j + 1), ops.row(j + 2), ops.row(j + 3)};
    dot8_rows4(hrow, rows, p.h, z + j);
  }
  for (; j < p.v; ++j) z[j] = dot8(hrow, ops.row(j), p.h);
  float m = -INFINITY;
  for (j = 0; j < p.v; ++j) {
    z[j] = (z[j] + (ops.b != nullptr ? ops.b[j] : 0.0f)) * p.inv_t;
    m = std::max(m, z[j]);
  }
  return m;
}

// dh = sum over j of gz[j] * weight row j, in ascending j, the first term stored (no pass to zero dh first). The
// columns go 32 at a time, their sums held in registers across all v rows (one load and store per row each
// otherwise: the store-to-load chain bound the loop), then 8, then one.
__attribute__((always_inline)) inline void weighted_rows(const LmHeadProblem& p, const Fp32Operands& ops,
                                                         const float* gz, float* dh) {
  int64_t k = 0;
  for (; k + 32 <= p.h; k += 32) {
    const float* w = ops.row(0) + k;
    Lanes8 a0 = gz[0] * load_lanes8(w), a1 = gz[0] * load_lanes8(w + 8);
    Lanes8 a2 = gz[0] * load_lanes8(w + 16), a3 = gz[0] * load_lanes8(w + 24);
    for (int64_t j = 1; j < p.v; ++j) {
      w = ops.row(j) + k;
      a0 += gz[j] * load_lanes8(w), a1 += gz[j] * load_lanes8(w + 8);
      a2 += gz[j] * load_lanes8(w + 16), a3 += gz[j] * load_lanes8(w + 24);
    }
    store_lanes8(dh + k, a0), store_lanes8(dh + k + 8, a1), store_lanes8(dh + k + 16, a2);
    store_lanes8(dh + k + 24, a3);
  }
  for (; k + 8 <= p.h; k += 8) {
    Lanes8 a = gz[0] * load_lanes8(ops.row(0) + k);
    for (int64_t j = 1; j < p.v; ++j) a += gz[j] * load_lanes8(ops.row(j) + k);
    store_lanes8(dh + k, a);
  }
  for (; k < p.h; ++k) {
    float a = gz[0] * ops.row(0)[k];
    for (int64_t j = 1; j < p.v; ++j) a += gz[j] * ops.row(j)[k];
    dh[k] = a;
  }
}

// The two kernels' bodies are compiled twice, inlined into a baseline and an AVX2 function (cpu_isa picks one
// per process): the loops are the same, each lane's operations and every sum's order too, so both give the same
// bits; the AVX2 form runs the dots and updates 8 wide.
__attribute__((always_inline)) inline bool forward(const LmHeadProblem& p, bool with_entropy, float* logp,
                                                   float* lse, float* entropy, float* logits) {
  for (int64_t i = 0; i < p.n; ++i)
    if (p.ids[i] < 0 || p.ids[i] >= p.v) return false;
  const Fp32Operands ops(p);
  Scratch& scratch = thread_scratch(p, logits == nullptr);
  float* const hrow = scratch.hrow.data();
  for (int64_t i = 0; i < p.n; ++i) {
    float* const z = logits != nullptr ? logits + i * p.v : scratch.z.data();
    load_row(p.hidden, p.dtype, p.stride_h, i, p.h, hrow);
    const float m = logits_row(p, ops, hrow, z);
    float s = 0.0f, t = 0.0f;  // sum exp(z - m), sum exp(z - m) (z - m): relative to the max, no cancellation
    for (int64_t j = 0; j < p.v; ++j) {
      const float e = std::exp(z[j] - m);
      s += e;
      t += e * (z[j] - m);
    }
    lse[i] = m + std::log(s);
    logp[i] = z[p.ids[i]] - lse[i];
    entropy[i] = with_entropy ? std::log(s) - t / s : 0.0f;  // zeros otherwise: the caller need not clear it
  }
  return true;
}

__attribute__((always_inline)) inline void backward(const LmHeadProblem& p, const float* g, const float* ge,
                                                    const float* lse, const float* entropy, float* d_hidden,
                                                    float* d_weight, float* d_bias, float* logits) {
  const Fp32Operands ops(p);
  Scratch& scratch = thread_scratch(p, logits == nullptr);
  float* const hrow = scratch.hrow.data();
  bool first = true;  // no row has added to d_weight / d_bias yet
  for (int64_t i = 0; i < p.n; ++i) {
    if (g[i] == 0.0f && (ge == nullptr || ge[i] == 0.0f)) {  // nothing flows back (padding; NaN is not 0): the
      std::fill(d_hidden + i * p.h, d_hidden + (i + 1) * p.h, 0.0f);  // row is left out, a NaN in it reaches nothing
      continue;
    }
    load_row(p.hidden, p.dtype, p.stride_h, i, p.h, hrow);
    float* const z = logits != nullptr ? logits + i * p.v : scratch.z.data();
    if (logits == nullptr) logits_row(p, ops, hrow, z);  // else the forward's, the same bits
    // z becomes d loss / d z in its own loop: the exp calls clobber every vector register, so the update loops
    // below stay free of calls (one loop doing both: ~15% slower at n = 1, v = 128, h = 64)
    for (int64_t j = 0; j < p.v; ++j) {
      const float x = z[j] - lse[i];  // log p
      const float pj = std::exp(x);
      // d logp / d z = onehot - p (1 - p at the target as -expm1: exact when p -> 1); d entropy / d z =
      // -p (log p + entropy); then the temperature's 1 / T
      float gz = j == p.ids[i] ? -std::expm1(x) * g[i] : -pj * g[i];
      if (ge != nullptr) gz -= ge[i] * pj * (x + entropy[i]);
      z[j] = gz * p.inv_t;
    }
    // the first term of each sum is stored, not added: no separate pass to zero the outputs (at decode sizes
    // that pass costs as much as the update)
    weighted_rows(p, ops, z, d_hidden + i * p.h);
    for (int64_t j = 0; j < p.v; ++j) {
      float* dwrow = d_weight + j * p.h;
      if (first) {
        for (int64_t k = 0; k < p.h; ++k) dwrow[k] = z[j] * hrow[k];
      } else {
        for (int64_t k = 0; k < p.h; ++k) dwrow[k] += z[j] * hrow[k];
      }
    }
    if (d_bias != nullptr)
      for (int64_t j = 0; j < p.v; ++j) d_bias[j] = first ? z[j] : d_bias[j] + z[j];
    first = false;
  }
  if (first) {  // every row left out (or none): zeros
    std::fill(d_weight, d_weight + p.v * p.h, 0.0f);
    if (d_bias != nullptr) std::fill(d_bias, d_bias + p.v, 0.0f);
  }
}

bool forward_baseline(const LmHeadProblem& p, bool with_entropy, float* logp, float* lse, float* entropy,
                      float* logits) {
  return forward(p, with_entropy, logp, lse, entropy, logits);
}

void backward_baseline(const LmHeadProblem& p, const float* g, const float* ge, const float* lse,
                       const float* entropy, float* d_hidden, float* d_weight, float* d_bias, float* logits) {
  backward(p, g, ge, lse, entropy, d_hidden, d_weight, d_bias, logits);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define R1K_AVX2_FORMS 1
__attribute__((target("avx2,f16c"))) bool forward_avx2(const LmHeadProblem& p, bool with_entropy, float* logp,
                                                       float* lse, float* entropy, float* logits) {
  return forward(p, with_entropy, logp, lse, entropy, logits);
}

__attribute__((target("avx2,f16c"))) void backward_avx2(const LmHeadProblem& p, const float* g, const float* ge,
                                                        const float* lse, const float* entropy, float* d_hidden,
                                                        float* d_weight, float* d_bias, float* logits) {
  backward(p, g, ge, lse, entropy, d_hidden, d_weight, d_bias, logits);
}
#endif

}  // namespace

bool lm_head_logprobs_small_cpu(const LmHeadProblem& p, bool with_entropy, float* logp, float* lse, float* entropy,
                                float* logits) {
#if defined(R1K_AVX2_FORMS)
  if (cpu_isa() >= CpuIsa::kAvx2) return forward_avx2(p, with_entropy, logp, lse, entropy, logits);
#endif
  return forward_baseline(p, with_entropy, logp, lse, entropy, logits);
}

void lm_head_logprobs_small_backward_cpu(const LmHeadProblem& p, const float* g, const float* ge, const float* lse,
                                         const float* entropy, float* d_hidden, float* d_weight, float* d_bias,
                                         float* logits) {
#if defined(R1K_AVX2_FORMS)
  if (cpu_isa() >= CpuIsa::kAvx2) return backward_avx2(p, g, ge, lse, entropy, d_hidden, d_weight, d_bias, logits);
#endif
  backward_baseline(p, g, ge, lse, entropy, d_hidden, d_weight, d_bias, logits);
}

}  // namespace r1k
