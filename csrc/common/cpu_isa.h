#pragma once
// The widest vector code the CPU kernels may pick at run time (the build itself targets baseline x86-64):
// what this CPU has, capped by R1K_CPU_ISA=baseline|avx2 when set (read once per process; tests run the
// narrower forms with it and compare their bits).
namespace r1k {

enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };  // kAvx2: AVX2 + F16C; kAvx512: F + BW

CpuIsa cpu_isa();

}  // namespace r1k
