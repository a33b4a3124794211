#pragma once
// Appending new latents to the paged MLA cache on the CPU: one pass that checks the new lengths and the pages they
// use, then copies each new row into its slot (the torch form is a dozen small ops and a host read per decode step).
#include <cstdint>

#include "mla/decode.h"

namespace r1k {

// kv_cache [num_blocks, page, width] of elements `elt` bytes wide, dense; block_table [batch, max_blocks] int32;
// lengths [batch] int32; latents [batch, s_new, width] dense, of the cache's dtype. new_lengths [batch] int32 =
// lengths + s_new. The lengths (>= 0), the new ones and the table entries their pages use are checked first
// (check_paged_lengths): on a bad one nothing is written and the status says which.
MlaDecodeStatus mla_append_cpu(void* kv_cache, int64_t elt, const int32_t* block_table, const int32_t* lengths,
                               const void* latents, int32_t* new_lengths, int64_t batch, int64_t s_new, int64_t width,
                               int64_t page, int64_t max_blocks, int64_t num_blocks);

}  // namespace r1k
