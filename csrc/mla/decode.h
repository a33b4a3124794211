#pragma once
// Absorbed-MLA decode over a paged latent cache on the CPU (FlashMLA's layout; the twin of the Triton
// split-KV kernels): per sequence, every (query, head) row attends to its visible keys, each key a 576-wide
// cache row (512 latent + 64 rope) whose first 512 columns are the value.
#include <cstdint>

#include "common/dtype.h"

namespace r1k {

struct MlaDecodeProblem {
  int64_t batch, s_q, heads;  // q [batch, s_q, heads, 576]
  int64_t page, max_blocks, num_blocks;  // kv_cache [num_blocks, page, 576], block_table [batch, max_blocks]
  float scale;
  bool causal;  // with s_q > 1, query i sees keys up to len - s_q + i (bottom-right aligned)
};

enum class MlaDecodeStatus : int { kOk = 0, kBadLength = 1, kBadBlock = 2 };

// Each of the batch lengths in [0, max_blocks * page] and the table entries its pages use in [0, num_blocks).
MlaDecodeStatus check_paged_lengths(const int32_t* block_table, const int32_t* lengths, int64_t batch, int64_t page,
                                    int64_t max_blocks, int64_t num_blocks);

// out [batch, s_q, heads, 512] in `dtype` (q's and the cache's), lse [batch, heads, s_q] fp32; a row with no
// visible key gets out 0 and lse +inf. Lengths must lie in [0, max_blocks * page] and the table entries a
// sequence uses in [0, num_blocks): otherwise nothing is written and the status says which.
MlaDecodeStatus mla_decode_cpu(const void* q, const void* kv_cache, DType dtype, const int32_t* block_table,
                               const int32_t* cache_seqlens, void* out, float* lse, const MlaDecodeProblem& p);

}  // namespace r1k
