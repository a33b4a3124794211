// The paged MLA cache append on the CPU (see append.h).
#include "mla/append.h"

#include <cstddef>
#include <cstring>
#include <limits>
#include <vector>

namespace r1k {

MlaDecodeStatus mla_append_cpu(void* kv_cache, int64_t elt, const int32_t* block_table, const int32_t* lengths,
                               const void* latents, int32_t* new_lengths, int64_t batch, int64_t s_new, int64_t width,
                               int64_t page, int64_t max_blocks, int64_t num_blocks) {
  std::vector<int32_t> grown(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = static_cast<int64_t>(lengths[b]) + s_new;
    if (lengths[b] < 0 || len > std::numeric_limits<int32_t>::max()) return MlaDecodeStatus::kBadLength;
    grown[b] = static_cast<int32_t>(len);
  }
  const MlaDecodeStatus status = check_paged_lengths(block_table, grown.data(), batch, page, max_blocks, num_blocks);
  if (status != MlaDecodeStatus::kOk) return status;
  const size_t row = static_cast<size_t>(width * elt);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < s_new; ++i) {
      const int64_t pos = lengths[b] + i;  // in [0, the grown length): its pages were checked
      const int64_t slot = static_cast<int64_t>(block_table[b * max_blocks + pos / page]) * page + pos % page;
      std::memcpy(static_cast<char*>(kv_cache) + slot * row, static_cast<const char*>(latents) + (b * s_new + i) * row,
                  row);
    }
    new_lengths[b] = grown[b];
  }
  return MlaDecodeStatus::kOk;
}

}  // namespace r1k
