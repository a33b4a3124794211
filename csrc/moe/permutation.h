#pragma once
// The MoE permutation index: from each token's chosen experts, the expert-sorted row layout the grouped
// GEMMs read. Stable (within an expert, rows follow the flat (token, slot) order), deterministic, and each
// expert's segment starts on a multiple of `align` rows (128 for the FP8 grouped GEMMs), padding rows
// carrying expert -1. Slots with a negative expert id (not routed here: dropped, or another rank's expert)
// get no row.
#include <cstdint>

#include "common/host_device.h"

namespace r1k {

struct PermutationProblem {
  int64_t slots;    // tokens x top_k
  int64_t experts;  // E
  int64_t align;    // segment alignment in rows (1: none)
  int64_t rows;     // rows of the row-indexed outputs (>= the aligned total)
};

R1K_HD int64_t aligned_rows(int64_t count, int64_t align) { return (count + align - 1) / align * align; }

// Outputs (all written in full):
//   counts [experts] int32: slots routed to each expert
//   offsets [experts + 1] int64: aligned segment starts, offsets[experts] = rows used
//   row_of [slots] int32: the row of each slot, -1 when not routed
//   source [rows] int32: the slot of each row, -1 on padding
//   row_expert [rows] int32: the expert of each row, -1 on padding
// Returns offsets[experts], the aligned total of rows (rows past p.rows are not written: the caller compares),
// or -1, with nothing written, when an id lies outside [-1, experts).
int64_t permutation_index_cpu(const int32_t* expert_ids, const PermutationProblem& p, int32_t* counts,
                              int64_t* offsets, int32_t* row_of, int32_t* source, int32_t* row_expert);

#if defined(R1K_WITH_CUDA)
// Scratch bytes permutation_index_cuda needs (CUB radix sort and scan); allocate it on the device.
int64_t permutation_index_workspace_cuda(const PermutationProblem& p);
// Returns a CUDA error string, or nullptr on success; `stream` is a cudaStream_t. No host synchronisation.
const char* permutation_index_cuda(const int32_t* expert_ids, const PermutationProblem& p, int32_t* counts,
                                   int64_t* offsets, int32_t* row_of, int32_t* source, int32_t* row_expert,
                                   void* workspace, int64_t workspace_bytes, void* stream);
#endif

}  // namespace r1k
