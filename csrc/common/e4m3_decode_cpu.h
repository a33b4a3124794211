#pragma once
// E4M3 codes -> fp32 for a run of codes on the CPU: AVX-512 where the CPU has it (16 codes per ~8
// instructions, through the fp16 converter), else AVX2 + F16C (16 codes per ~14), else the 256-entry table,
// the fastest form for baseline x86-64 (what the build targets). Chosen once per process (common/cpu_isa.h).
#include <cstdint>

namespace r1k {

void e4m3_decode_run(const uint8_t* codes, int64_t n, float* out);

}  // namespace r1k
