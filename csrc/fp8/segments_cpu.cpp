#include "fp8/segments.h"

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

}  // namespace r1k
