#pragma once
// MoE row movement on the CPU, the twins of the Triton row kernels (r1kernels/moe/kernels/rows.py): the
// gather into the expert-sorted layout (permute, and unpermute's row gradient), the weighted combine back to
// tokens (unpermute, and permute's gradient), and the per-slot dot product (unpermute's weight gradient).
// Every sum is in fp32 over a token's slots in slot order, so results are deterministic.
#include <cstdint>

#include "common/dtype.h"

namespace r1k {

struct RowsProblem {
  int64_t rows;        // R: rows of the expert-sorted layout
  int64_t tokens;      // T
  int64_t top_k;       // k: slots per token
  int64_t hidden;      // H: elements per row
  int64_t row_stride;  // elements between rows of the strided input (x / y); outputs are contiguous
};

// out[r] = x[slots[r] / k] (times weights[slots[r]] when weights is not null), zero where slots[r] < 0.
// Unweighted rows are copied as `elem_bytes`-byte elements (FP8 codes travel as bytes); weighted ones are
// computed in fp32 and rounded to `dtype` (nearest even).
void gather_rows_cpu(const void* x, const int32_t* slots, const float* weights, void* out, const RowsProblem& p,
                     DType dtype, int64_t elem_bytes);

// out[t] = sum_j weights[t, j] * y[row_of[t, j]] over slots with row_of >= 0 (weight 1 when weights is null), in
// fp32, rounded to `dtype`; a token with no routed slot is zero.
void combine_rows_cpu(const void* y, const int32_t* row_of, const float* weights, void* out, const RowsProblem& p,
                      DType dtype);

// out[t, j] = <d[t], y[row_of[t, j]]> in fp32 (0 where row_of < 0); d is [T, H] contiguous in `d_dtype`,
// y [R, H] with row_stride in `y_dtype`.
void row_dot_cpu(const void* d, DType d_dtype, const void* y, DType y_dtype, const int32_t* row_of, float* out,
                 const RowsProblem& p);

}  // namespace r1k
