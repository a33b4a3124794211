// MoE permutation index on the CPU: a stable counting sort. Each thread counts the experts of its
// contiguous range of slots; a prefix over (expert, thread) then gives every thread its first row in each
// expert's segment, so the parallel scatter places rows exactly where a sequential pass would.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "moe/permutation.h"

namespace r1k {

int64_t permutation_index_cpu(const int32_t* expert_ids, const PermutationProblem& p, int32_t* counts,
                              int64_t* offsets, int32_t* row_of, int32_t* source, int32_t* row_expert) {
  const int64_t E = p.experts, n = p.slots;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), n / 4096)));
  std::vector<int64_t> per_thread(static_cast<size_t>(threads) * E, 0);  // [thread][expert] counts, then starts
  auto range = [&](int th) {
    return std::pair<int64_t, int64_t>(n * th / threads, n * (th + 1) / threads);
  };
  bool bad = false;  // an id outside [-1, E): nothing is written to the outputs
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(|| : bad)
  for (int th = 0; th < threads; ++th) {
    const auto [lo, hi] = range(th);
    int64_t* c = per_thread.data() + static_cast<size_t>(th) * E;
    for (int64_t i = lo; i < hi; ++i) {
      const int32_t e = expert_ids[i];
      if (e >= E || e < -1) {
        bad = true;
        break;
      }
      if (e >= 0) ++c[e];
    }
  }
  if (bad) return -1;
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    offsets[e] = row;
    int64_t count = 0;
    for (int th = 0; th < threads; ++th) {
      int64_t& c = per_thread[static_cast<size_t>(th) * E + e];
      const int64_t mine = c;
      c = row + count;  // this thread's first row in expert e's segment
      count += mine;
    }
    counts[e] = static_cast<int32_t>(count);
    row += aligned_rows(count, p.align);
  }
  offsets[E] = row;
  std::fill(source, source + p.rows, -1);
  std::fill(row_expert, row_expert + p.rows, -1);
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int th = 0; th < threads; ++th) {
    const auto [lo, hi] = range(th);
    int64_t* next = per_thread.data() + static_cast<size_t>(th) * E;
    for (int64_t i = lo; i < hi; ++i) {
      const int32_t e = expert_ids[i];
      if (e < 0) {
        row_of[i] = -1;
        continue;
      }
      const int64_t r = next[e]++;
      if (r >= p.rows) {  // too few rows allocated (the caller checks offsets[experts] <= rows)
        row_of[i] = -1;
        continue;
      }
      row_of[i] = static_cast<int32_t>(r);
      source[r] = static_cast<int32_t>(i);
      row_expert[r] = e;
    }
  }
  return row;
}

}  // namespace r1k
