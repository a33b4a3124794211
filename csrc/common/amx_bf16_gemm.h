#pragma once
// bf16 x bf16 -> fp32 GEMMs on Intel AMX tiles (the CPU twin of a tensor-core GEMM with an fp32 epilogue).
// PyTorch's CPU matmul has no bf16-in / fp32-out form: a bf16 GEMM rounds its output to bf16, so code that
// needs fp32 results (the LM-head logits) ran its GEMMs in fp32 at 1/5 to 1/7 of the AMX rate. Every product
// of two bf16 values is exact in fp32 and AMX adds them in fp32, so these results are what an fp32 GEMM of
// the same bf16 inputs gives, up to the order of the additions.
#include <cstdint>

namespace r1k {

// Whether this process can run AMX-BF16: x86-64, the CPU reports AMX-TILE and AMX-BF16, and Linux granted
// the tile-data permission (asked once, on the first call). False anywhere else; nothing here may be called
// then.
bool amx_bf16_usable();

// Size in 32-bit words of b packed by amx_pack_b_nt: n rounded up to 32 columns, k up to 32.
int64_t amx_packed_b_words(int64_t n, int64_t k);

// b [n, k] bf16 (row stride ldb, in elements) as the right operand of a @ b^T, in AMX's layout: 16-column
// panels, each k/2 rows of 16 pairs (b[j][2i], b[j][2i + 1]); padding columns and k past its end are zero.
void amx_pack_b_nt(const uint16_t* b, int64_t ldb, int64_t n, int64_t k, uint32_t* packed);

// c [m, n] fp32 (row stride ldc) = alpha * (a @ b^T + bias) with a [m, k] bf16 (row stride lda), b packed
// by amx_pack_b_nt from [n, k], bias [n] fp32 or null. OpenMP over 32-column blocks of c.
void amx_bf16_gemm_nt(const uint16_t* a, int64_t lda, int64_t m, const uint32_t* packed_b, int64_t n, int64_t k,
                      const float* bias, float alpha, float* c, int64_t ldc);

}  // namespace r1k
