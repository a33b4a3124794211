// MLA decode on the CPU (see decode.h). Per sequence: the (query, head) rows in fp32, then per block of 64 keys
// (converted to fp32 once, shared by all rows) and per row: the scores (dots of 576), an online softmax, and the
// block's values added into the row's fp32 accumulator. The dot and the scaled add are compiled for AVX-512,
// AVX2 and baseline x86-64, picked at load time. (Tiles of 4 rows sharing each key load were tried: no faster.)
#include "mla/decode.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/cpu_vector.h"
#include "common/host_device.h"

namespace r1k {
namespace {

constexpr int64_t kWidth = 576, kLatent = 512;
constexpr int64_t kKeys = 64;  // keys per block

R1K_VECTOR_CLONES float dot(const float* x, const float* y, int64_t n) {
  float part[16] = {};  // fixed lanes: vectorizable, and the same order on every run
  for (int64_t i = 0; i < n; i += 16)  // n is a multiple of 16 here (576)
    for (int l = 0; l < 16; ++l) part[l] += x[i + l] * y[i + l];
  float s = 0.0f;
  for (float v : part) s += v;
  return s;
}

// acc = acc * keep + sum_j w[j] * values[j] over the block's keys (values rows kWidth apart)
R1K_VECTOR_CLONES void rescale_add(float* acc, float keep, const float* w, const float* values, int64_t keys) {
  for (int64_t i = 0; i < kLatent; ++i) acc[i] *= keep;
  for (int64_t j = 0; j < keys; ++j) {
    const float wj = w[j];
    const float* v = values + j * kWidth;
    for (int64_t i = 0; i < kLatent; ++i) acc[i] += wj * v[i];
  }
}

void to_float(const void* base, DType dtype, int64_t offset, int64_t n, float* out) {
  if (dtype == DType::kFloat32) {
    const float* p = static_cast<const float*>(base) + offset;
    std::copy(p, p + n, out);
    return;
  }
  const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
  if (dtype == DType::kBFloat16) {
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(p[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_float(p[i]);
  }
}

void store(const float* row, int64_t n, float factor, DType dtype, void* base, int64_t offset) {
  if (dtype == DType::kFloat32) {
    float* p = static_cast<float*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) p[i] = row[i] * factor;
    return;
  }
  uint16_t* p = static_cast<uint16_t*>(base) + offset;
  for (int64_t i = 0; i < n; ++i)
    p[i] = dtype == DType::kBFloat16 ? float_to_bf16_rne(row[i] * factor) : float_to_fp16_rne(row[i] * factor);
}

void decode_sequence(const void* q, const void* kv, DType dtype, const int32_t* table, int64_t len, int64_t b,
                     void* out, float* lse, const MlaDecodeProblem& p) {
  const int64_t R = p.s_q * p.heads;
  std::vector<float> rows(static_cast<size_t>(R * kWidth)), acc(static_cast<size_t>(R * kLatent), 0.0f);
  std::vector<float> keys(static_cast<size_t>(kKeys * kWidth)), w(static_cast<size_t>(kKeys));
  std::vector<float> max_score(static_cast<size_t>(R), -std::numeric_limits<float>::infinity());
  std::vector<float> sum(static_cast<size_t>(R), 0.0f);
  to_float(q, dtype, b * R * kWidth, R * kWidth, rows.data());
  for (int64_t j0 = 0; j0 < len; j0 += kKeys) {
    const int64_t n = std::min(kKeys, len - j0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = j0 + j;
      const int64_t block = table[b * p.max_blocks + pos / p.page];
      to_float(kv, dtype, (block * p.page + pos % p.page) * kWidth, kWidth, keys.data() + j * kWidth);
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t last = p.causal ? len - p.s_q + r / p.heads : len - 1;  // the row's last visible key
      const int64_t visible = std::clamp<int64_t>(last - j0 + 1, 0, n);
      if (visible == 0) continue;
      float block_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < visible; ++j) {
        w[j] = dot(rows.data() + r * kWidth, keys.data() + j * kWidth, kWidth) * p.scale;
        block_max = std::max(block_max, w[j]);
      }
      const float m = std::max(max_score[r], block_max);
      const float keep = std::exp(max_score[r] - m);  // 0 on the row's first block (exp(-inf))
      float block_sum = 0.0f;
      for (int64_t j = 0; j < visible; ++j) {
        w[j] = std::exp(w[j] - m);
        block_sum += w[j];
      }
      sum[r] = sum[r] * keep + block_sum;
      max_score[r] = m;
      rescale_add(acc.data() + r * kLatent, keep, w.data(), keys.data(), visible);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = r / p.heads, h = r % p.heads;
    const bool empty = sum[r] == 0.0f;
    store(acc.data() + r * kLatent, kLatent, empty ? 0.0f : 1.0f / sum[r], dtype, out, (b * R + r) * kLatent);
    lse[(b * p.heads + h) * p.s_q + i] =
        empty ? std::numeric_limits<float>::infinity() : max_score[r] + std::log(sum[r]);
  }
}

}  // namespace

MlaDecodeStatus mla_decode_cpu(const void* q, const void* kv_cache, DType dtype, const int32_t* block_table,
                               const int32_t* cache_seqlens, void* out, float* lse, const MlaDecodeProblem& p) {
  for (int64_t b = 0; b < p.batch; ++b) {  // every check before anything is written
    const int64_t len = cache_seqlens[b];
    if (len < 0 || len > p.max_blocks * p.page) return MlaDecodeStatus::kBadLength;
    for (int64_t k = 0; k < (len + p.page - 1) / p.page; ++k) {
      const int32_t block = block_table[b * p.max_blocks + k];
      if (block < 0 || block >= p.num_blocks) return MlaDecodeStatus::kBadBlock;
    }
  }
  const int64_t work = p.batch * p.s_q * p.heads * p.max_blocks * p.page;
#pragma omp parallel for schedule(dynamic, 1) if (p.batch > 1 && work >= (1 << 14))
  for (int64_t b = 0; b < p.batch; ++b)
    decode_sequence(q, kv_cache, dtype, block_table, cache_seqlens[b], b, out, lse, p);
  return MlaDecodeStatus::kOk;
}

}  // namespace r1k
