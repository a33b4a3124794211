// MLA decode on the CPU (see decode.h). Per sequence: the (query, head) rows in fp32, then per block of 64 keys
// (converted to fp32 once, shared by all rows): the scores of groups of 8 rows, which share every key load, then
// per 4 rows an online softmax and the block's values added into the rows' fp32 accumulators, 64 columns of
// each held in registers across the block's keys. The vector functions are compiled for AVX-512, AVX2 and
// baseline x86-64, picked at load time.
#include "mla/decode.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "common/cpu_vector.h"
#include "common/host_device.h"

namespace r1k {
namespace {

constexpr int64_t kWidth = 576, kLatent = 512;
constexpr int64_t kKeys = 64;  // keys per block
constexpr int kGroup = 8;  // rows whose scores are formed together (the rows are padded to a multiple)
constexpr int kSumRows = 4;  // rows whose value sums are formed together (divides kGroup)

// The scaled scores of kGroup rows x (kWidth apart) against one key, written kKeys apart from s. The rows share
// every load of the key; each row sums in 16 fixed lanes, then pairwise (the same result on every CPU and run),
// and the group's horizontal sums are independent, so they overlap instead of each waiting on the last.
R1K_VECTOR_CLONES void scores_of_group(const float* x, const float* key, float scale, float* s) {
  float part[kGroup][16] = {};
  for (int64_t i = 0; i < kWidth; i += 16)
    for (int r = 0; r < kGroup; ++r)
      for (int l = 0; l < 16; ++l) part[r][l] += x[r * kWidth + i + l] * key[i + l];
  for (int r = 0; r < kGroup; ++r) {
    float* v = part[r];
    for (int l = 0; l < 8; ++l) v[l] += v[l + 8];
    for (int l = 0; l < 4; ++l) v[l] += v[l + 4];
    s[r * kKeys] = ((v[0] + v[2]) + (v[1] + v[3])) * scale;
  }
}

// acc[t] = acc[t] * keep[t] + sum_{j < keys[t]} w[t][j] * values[j] for the kSumRows rows t (accumulators kLatent
// apart, weights kKeys apart, values rows kWidth apart). 64 columns of every row stay in registers across the
// keys, and the rows share each value load: the block's values are read once per kSumRows rows and 64 columns.
R1K_VECTOR_CLONES void rescale_add(float* acc, const float* keep, const float* w, const int64_t* keys,
                                   const float* values) {
  int64_t all = keys[0];
  for (int t = 1; t < kSumRows; ++t) all = std::min(all, keys[t]);
  for (int64_t i0 = 0; i0 < kLatent; i0 += 64) {
    float c[kSumRows][64];
    for (int t = 0; t < kSumRows; ++t)
      for (int l = 0; l < 64; ++l) c[t][l] = acc[t * kLatent + i0 + l] * keep[t];
    for (int64_t j = 0; j < all; ++j) {
      const float* v = values + j * kWidth + i0;
      for (int t = 0; t < kSumRows; ++t) {
        const float u = w[t * kKeys + j];
        for (int l = 0; l < 64; ++l) c[t][l] += u * v[l];
      }
    }
    for (int t = 0; t < kSumRows; ++t)  // keys only some rows see: never 0 x value (Inf values stay unseen)
      for (int64_t j = all; j < keys[t]; ++j)
        for (int l = 0; l < 64; ++l) c[t][l] += w[t * kKeys + j] * values[j * kWidth + i0 + l];
    for (int t = 0; t < kSumRows; ++t)
      for (int l = 0; l < 64; ++l) acc[t * kLatent + i0 + l] = c[t][l];
  }
}

R1K_VECTOR_CLONES void to_float(const void* base, DType dtype, int64_t offset, int64_t n, float* out) {
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

// One loop per dtype: with the dtype chosen per element (and fp16's rounding branches beside bf16's) the loop stayed
// scalar, ~10 cycles an element, most of a one-token decode.
R1K_VECTOR_CLONES void store(const float* row, int64_t n, float factor, DType dtype, void* base, int64_t offset) {
  if (dtype == DType::kFloat32) {
    float* p = static_cast<float*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) p[i] = row[i] * factor;
  } else if (dtype == DType::kBFloat16) {
    uint16_t* p = static_cast<uint16_t*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16_rne(row[i] * factor);
  } else {
    uint16_t* p = static_cast<uint16_t*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) p[i] = float_to_fp16_rne(row[i] * factor);
  }
}

// One row's online-softmax step over the block: scores s (the first `visible` used) -> weights in s; returns the
// factor that rescales the row's previous accumulator.
float softmax_step(float* s, int64_t visible, float& max_score, float& sum) {
  float block_max = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < visible; ++j) block_max = std::max(block_max, s[j]);
  const float m = std::max(max_score, block_max);
  const float keep = std::exp(max_score - m);  // 0 on the row's first block (exp(-inf))
  float block_sum = 0.0f;
  for (int64_t j = 0; j < visible; ++j) {
    s[j] = std::exp(s[j] - m);
    block_sum += s[j];
  }
  sum = sum * keep + block_sum;
  max_score = m;
  return keep;
}

// A thread's buffers, kept across calls: the block's fp32 keys alone are 144 KiB, past malloc's mmap threshold, so
// fresh ones cost an mmap, a page fault per 4 KiB and an munmap per call (~15 us, most of a one-token decode).
struct Scratch {
  std::vector<float> rows, acc, keys, scores, max_score, sum;
  void fit(int64_t padded) {
    for (auto [v, n] : {std::pair{&rows, padded * kWidth}, {&acc, padded * kLatent}, {&keys, kKeys * kWidth},
                        {&scores, padded * kKeys}, {&max_score, padded}, {&sum, padded}})
      if (static_cast<int64_t>(v->size()) < n) v->resize(static_cast<size_t>(n));
  }
};

void decode_sequence(const void* q, const void* kv, DType dtype, const int32_t* table, int64_t len, int64_t b,
                     void* out, float* lse, const MlaDecodeProblem& p) {
  const int64_t R = p.s_q * p.heads, padded = (R + kGroup - 1) / kGroup * kGroup;  // padding rows: zero, unseen
  static thread_local Scratch scratch;
  scratch.fit(padded);
  std::vector<float>& rows = scratch.rows;
  std::vector<float>& acc = scratch.acc;
  std::vector<float>& keys = scratch.keys;
  std::vector<float>& scores = scratch.scores;
  std::vector<float>& max_score = scratch.max_score;
  std::vector<float>& sum = scratch.sum;
  // what the loops read before they write: the padding rows, the accumulators (scaled by 0 on a row's first
  // block: garbage could be Inf), each row's running max and sum
  std::fill(rows.begin() + R * kWidth, rows.begin() + padded * kWidth, 0.0f);
  std::fill(acc.begin(), acc.begin() + padded * kLatent, 0.0f);
  std::fill(max_score.begin(), max_score.begin() + padded, -std::numeric_limits<float>::infinity());
  std::fill(sum.begin(), sum.begin() + padded, 0.0f);
  to_float(q, dtype, b * R * kWidth, R * kWidth, rows.data());
  for (int64_t j0 = 0; j0 < len; j0 += kKeys) {
    const int64_t n = std::min(kKeys, len - j0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = j0 + j;
      const int64_t block = table[b * p.max_blocks + pos / p.page];
      float* key = keys.data() + j * kWidth;
      to_float(kv, dtype, (block * p.page + pos % p.page) * kWidth, kWidth, key);
      for (int64_t g = 0; g < padded; g += kGroup)
        scores_of_group(rows.data() + g * kWidth, key, p.scale, scores.data() + g * kKeys + j);
    }
    for (int64_t r0 = 0; r0 < padded; r0 += kSumRows) {
      int64_t visible[kSumRows];
      float keep[kSumRows];
      bool any = false;
      for (int t = 0; t < kSumRows; ++t) {
        const int64_t r = r0 + t;
        const int64_t last = p.causal ? len - p.s_q + r / p.heads : len - 1;  // the row's last visible key
        visible[t] = r < R ? std::clamp<int64_t>(last - j0 + 1, 0, n) : 0;
        // a row with nothing visible in this block keeps its state: factor 1, no keys added
        keep[t] = visible[t] ? softmax_step(scores.data() + r * kKeys, visible[t], max_score[r], sum[r]) : 1.0f;
        any = any || visible[t] > 0;
      }
      if (any)
        rescale_add(acc.data() + r0 * kLatent, keep, scores.data() + r0 * kKeys, visible, keys.data());
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

MlaDecodeStatus check_paged_lengths(const int32_t* block_table, const int32_t* lengths, int64_t batch, int64_t page,
                                    int64_t max_blocks, int64_t num_blocks) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = lengths[b];
    if (len < 0 || len > max_blocks * page) return MlaDecodeStatus::kBadLength;
    for (int64_t k = 0; k < (len + page - 1) / page; ++k) {
      const int32_t block = block_table[b * max_blocks + k];
      if (block < 0 || block >= num_blocks) return MlaDecodeStatus::kBadBlock;
    }
  }
  return MlaDecodeStatus::kOk;
}

MlaDecodeStatus mla_decode_cpu(const void* q, const void* kv_cache, DType dtype, const int32_t* block_table,
                               const int32_t* cache_seqlens, void* out, float* lse, const MlaDecodeProblem& p) {
  // every check before anything is written
  const MlaDecodeStatus status =
      check_paged_lengths(block_table, cache_seqlens, p.batch, p.page, p.max_blocks, p.num_blocks);
  if (status != MlaDecodeStatus::kOk) return status;
  const int64_t work = p.batch * p.s_q * p.heads * p.max_blocks * p.page;
#pragma omp parallel for schedule(dynamic, 1) if (p.batch > 1 && work >= (1 << 14))
  for (int64_t b = 0; b < p.batch; ++b)
    decode_sequence(q, kv_cache, dtype, block_table, cache_seqlens[b], b, out, lse, p);
  return MlaDecodeStatus::kOk;
}

}  // namespace r1k
