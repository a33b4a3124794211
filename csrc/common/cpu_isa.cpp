#include "common/cpu_isa.h"

#include <cstdlib>
#include <cstring>

namespace r1k {
namespace {

CpuIsa detect() {
  CpuIsa isa = CpuIsa::kBaseline;
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) isa = CpuIsa::kAvx2;
  if (isa == CpuIsa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
    isa = CpuIsa::kAvx512;
#endif
  const char* cap = std::getenv("R1K_CPU_ISA");
  if (cap != nullptr && std::strcmp(cap, "baseline") == 0) return CpuIsa::kBaseline;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && isa > CpuIsa::kAvx2) return CpuIsa::kAvx2;
  return isa;
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect();
  return isa;
}

}  // namespace r1k
