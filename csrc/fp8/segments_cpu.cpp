#include "fp8/segments.h"

#include <algorithm>
#include <cstddef>
#include <vector>

namespace r1k {

int64_t contiguous_segments_cpu(const int32_t* m_indices, int64_t rows, int64_t experts, int64_t segment) {
  int64_t real = 0;
  for (int64_t s0 = 0; s0 < rows; s0 += segment) {
    const int32_t expert = m_indices[s0];  // the GPU kernels take a segment's expert from its first row
    for (int64_t r = s0; r < s0 + segment && r < rows; ++r) {
      const int32_t e = m_indices[r];
      if (e < -1 || e >= experts || (e != expert && e != -1)) return -1;
      real += e >= 0;
    }
  }
  return real;
}

bool token_ranges_cpu(const int32_t* m_indices, int64_t rows, int64_t experts, int64_t segment, bool real_end,
                      int32_t* ranges) {
  std::vector<int64_t> first(static_cast<size_t>(experts), -1), end(static_cast<size_t>(experts), 0),
      count(static_cast<size_t>(experts), 0);
  for (int64_t s0 = 0; s0 < rows; s0 += segment) {
    const int32_t e = m_indices[s0];  // the segment's expert (a segment starting with -1 is all padding)
    if (e < 0) continue;
    if (first[e] < 0) first[e] = s0;
    end[e] = s0 + segment;
    ++count[e];
  }
  for (int64_t e = 0; e < experts; ++e)
    if (count[e] && end[e] - first[e] != count[e] * segment) return false;
  if (real_end) {
    for (int64_t e = 0; e < experts; ++e) {
      if (!count[e]) continue;
      int64_t last = end[e] - 1;  // the last segment starts with a real row: the scan stops by its first row
      while (m_indices[last] != e) --last;
      end[e] = std::min(end[e], (last + 1 + 15) / 16 * 16);
    }
  }
  for (int64_t e = 0; e < experts; ++e) {
    ranges[2 * e] = count[e] ? static_cast<int32_t>(first[e]) : 0;
    ranges[2 * e + 1] = count[e] ? static_cast<int32_t>(end[e]) : 0;
  }
  return true;
}

}  // namespace r1k
