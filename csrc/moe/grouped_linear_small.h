#pragma once
// The MoE expert linear for few rows on the CPU (decode): out[r] = x[r] @ weight[e].T with e = row_expert[r],
// each expert's weight rows converted to fp32 once per block of rows that share the expert (a decode step
// reads each active expert's weight once). fp32 sums, rounded once to the output dtype.
#include <cstdint>

#include "common/dtype.h"

namespace r1k {

struct GroupedLinearProblem {
  int64_t rows, n, k;  // x [rows, k], weight [experts, n, k] (both contiguous), out [rows, n]
};

// row_expert[r] < 0: a padding row, written as zeros.
void grouped_linear_small_cpu(const void* x, const void* weight, const int32_t* row_expert, void* out, DType dtype,
                              const GroupedLinearProblem& p);

}  // namespace r1k
