// MoE permutation index on the GPU: a stable CUB radix sort of (expert, slot) pairs, segment bounds from
// the sorted keys, an aligned exclusive scan for the segment starts, then one pass that writes every map.
// No host synchronisation; the caller allocates the scratch (permutation_index_workspace_cuda bytes).
#include <cuda_runtime.h>

#include <cub/cub.cuh>

#include "moe/permutation.h"

namespace r1k {
namespace {

constexpr int kThreads = 256;

int end_bit(int64_t experts) {  // keys are 0..experts (experts: not routed)
  int bits = 1;
  while ((int64_t{1} << bits) <= experts) ++bits;
  return bits;
}

struct Workspace {
  uint32_t *keys_in, *keys_out;
  int32_t *slots_in, *slots_out;
  int32_t *seg_start, *seg_end;  // [experts + 1]
  int64_t* aligned;              // [experts + 1], the last 0
  void* sort_temp;
  size_t sort_bytes;
  void* scan_temp;
  size_t scan_bytes;
  int64_t total;
};

size_t round256(size_t b) { return (b + 255) / 256 * 256; }

// Lays the workspace out from `base` (nullptr: only sizes it).
Workspace layout(const PermutationProblem& p, char* base) {
  Workspace w{};
  const size_t n = static_cast<size_t>(p.slots), e1 = static_cast<size_t>(p.experts + 1);
  cub::DeviceRadixSort::SortPairs(nullptr, w.sort_bytes, w.keys_in, w.keys_out, w.slots_in, w.slots_out,
                                  static_cast<int64_t>(n), 0, end_bit(p.experts));
  cub::DeviceScan::ExclusiveSum(nullptr, w.scan_bytes, w.aligned, w.aligned, static_cast<int64_t>(e1));
  size_t at = 0;
  auto take = [&](size_t bytes) {
    char* ptr = base ? base + at : nullptr;
    at += round256(bytes);
    return ptr;
  };
  w.keys_in = reinterpret_cast<uint32_t*>(take(n * 4));
  w.keys_out = reinterpret_cast<uint32_t*>(take(n * 4));
  w.slots_in = reinterpret_cast<int32_t*>(take(n * 4));
  w.slots_out = reinterpret_cast<int32_t*>(take(n * 4));
  w.seg_start = reinterpret_cast<int32_t*>(take(e1 * 4));
  w.seg_end = reinterpret_cast<int32_t*>(take(e1 * 4));
  w.aligned = reinterpret_cast<int64_t*>(take(e1 * 8));
  w.sort_temp = take(w.sort_bytes);
  w.scan_temp = take(w.scan_bytes);
  w.total = static_cast<int64_t>(at);
  return w;
}

__global__ void make_keys(const int32_t* __restrict__ ids, int64_t n, int64_t experts, uint32_t* __restrict__ keys,
                          int32_t* __restrict__ slots) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  keys[i] = ids[i] < 0 ? static_cast<uint32_t>(experts) : static_cast<uint32_t>(ids[i]);
  slots[i] = static_cast<int32_t>(i);
}

// Where each expert's run starts and ends among the sorted keys (untouched: an empty expert, 0 and 0).
__global__ void segment_bounds(const uint32_t* __restrict__ keys, int64_t n, int32_t* __restrict__ start,
                               int32_t* __restrict__ end) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  const uint32_t k = keys[i];
  if (i == 0 || keys[i - 1] != k) start[k] = static_cast<int32_t>(i);
  if (i == n - 1 || keys[i + 1] != k) end[k] = static_cast<int32_t>(i + 1);
}

__global__ void counts_and_aligned(const int32_t* __restrict__ start, const int32_t* __restrict__ end,
                                   PermutationProblem p, int32_t* __restrict__ counts, int64_t* __restrict__ aligned) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e > p.experts) return;
  if (e == p.experts) {
    aligned[e] = 0;
    return;
  }
  const int32_t c = end[e] - start[e];
  counts[e] = c;
  aligned[e] = aligned_rows(c, p.align);
}

__global__ void write_maps(const uint32_t* __restrict__ keys, const int32_t* __restrict__ slots,
                           const int32_t* __restrict__ start, const int64_t* __restrict__ offsets,
                           PermutationProblem p, int32_t* __restrict__ row_of, int32_t* __restrict__ source,
                           int32_t* __restrict__ row_expert) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.slots) return;
  const uint32_t e = keys[i];
  const int32_t slot = slots[i];
  if (e == static_cast<uint32_t>(p.experts)) {
    row_of[slot] = -1;
    return;
  }
  const int64_t r = offsets[e] + (i - start[e]);
  if (r >= p.rows) {  // too few rows allocated (the caller checks offsets[experts] <= rows on the device)
    row_of[slot] = -1;
    return;
  }
  row_of[slot] = static_cast<int32_t>(r);
  source[r] = slot;
  row_expert[r] = static_cast<int32_t>(e);
}

unsigned blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

int64_t permutation_index_workspace_cuda(const PermutationProblem& p) { return layout(p, nullptr).total; }

const char* permutation_index_cuda(const int32_t* expert_ids, const PermutationProblem& p, int32_t* counts,
                                   int64_t* offsets, int32_t* row_of, int32_t* source, int32_t* row_expert,
                                   void* workspace, int64_t workspace_bytes, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  Workspace w = layout(p, static_cast<char*>(workspace));
  if (workspace_bytes < w.total) return "workspace too small";
  const size_t e1 = static_cast<size_t>(p.experts + 1);
  cudaMemsetAsync(w.seg_start, 0, e1 * 4, stream);
  cudaMemsetAsync(w.seg_end, 0, e1 * 4, stream);
  cudaMemsetAsync(source, 0xFF, static_cast<size_t>(p.rows) * 4, stream);  // -1: padding
  cudaMemsetAsync(row_expert, 0xFF, static_cast<size_t>(p.rows) * 4, stream);
  if (p.slots > 0) {
    make_keys<<<blocks(p.slots), kThreads, 0, stream>>>(expert_ids, p.slots, p.experts, w.keys_in, w.slots_in);
    cub::DeviceRadixSort::SortPairs(w.sort_temp, w.sort_bytes, w.keys_in, w.keys_out, w.slots_in, w.slots_out,
                                    p.slots, 0, end_bit(p.experts), stream);
    segment_bounds<<<blocks(p.slots), kThreads, 0, stream>>>(w.keys_out, p.slots, w.seg_start, w.seg_end);
  }
  counts_and_aligned<<<blocks(p.experts + 1), kThreads, 0, stream>>>(w.seg_start, w.seg_end, p, counts, w.aligned);
  cub::DeviceScan::ExclusiveSum(w.scan_temp, w.scan_bytes, w.aligned, offsets, static_cast<int64_t>(e1), stream);
  if (p.slots > 0)
    write_maps<<<blocks(p.slots), kThreads, 0, stream>>>(w.keys_out, w.slots_out, w.seg_start, offsets, p, row_of,
                                                         source, row_expert);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace r1k
