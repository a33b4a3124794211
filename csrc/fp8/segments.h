#pragma once
#include <cstdint>

namespace r1k {

// DeepGEMM's contiguous grouped layout: m_indices [rows] int32, every id in [-1, experts), each run of
// `segment` rows the expert of its first row or padding (-1); a segment that starts with -1 is all padding.
// Returns the number of real rows (id >= 0), or -1 when the ids break the layout. One pass, for decode-sized
// calls that would otherwise pay a dozen torch ops to check.
int64_t contiguous_segments_cpu(const int32_t* m_indices, int64_t rows, int64_t experts, int64_t segment);

// The k-grouped weight gradient's token range of each expert, for ids that pass contiguous_segments_cpu (rows a
// multiple of segment): ranges [experts, 2] int32 = (first row, end row) of the expert's segments, (0, 0) for an
// expert with none. With real_end, the end is the expert's last real row + 1 rounded up to a multiple of 16 (the
// rows past it are padding, whose zeroed codes add nothing). Returns false, writing nothing, when an expert's
// segments are not one contiguous run.
bool token_ranges_cpu(const int32_t* m_indices, int64_t rows, int64_t experts, int64_t segment, bool real_end,
                      int32_t* ranges);

}  // namespace r1k
