// The CPU features each ISA level needs, in one place: the run-time choice (cpu/isa.cpp) and the
// build's BATCHNORM_MAX_ISA=native probe (cpu/cpu_level_probe.cpp, run by csrc/CMakeLists.txt)
// both ask cpu_level(), so a build for "this machine" compiles exactly the levels it would run.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

namespace batchnorm::cpu {

// Levels by number, lowest first: the names BATCHNORM_ISA and BATCHNORM_MAX_ISA take.
constexpr const char* kLevelNames[] = {"baseline", "avx2", "avx512", "avx512_bf16"};
constexpr int kLevelCount = 4;

// The highest level this CPU and its OS run: 0 baseline, 1 avx2 (AVX2, FMA, F16C, BMI2),
// 2 avx512 (and AVX-512 F, BW, VL, DQ), 3 avx512_bf16 (and AVX512_BF16). Read from cpuid, with
// XCR0 for the registers the OS saves (AVX's, AVX-512's), rather than __builtin_cpu_supports,
// whose feature names vary by compiler: clang 16 refuses "f16c", and older clangs "avx512bf16",
// so the library did not compile with them. Internal linkage (static), and never
// included by the kernel objects: a copy compiled with a level's -m flags must not be the one
// the linker keeps for the dispatcher, which runs anywhere.
static inline int cpu_level() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  unsigned a, b, c, d;
  if (__get_cpuid_max(0, nullptr) < 7 || !__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const bool fma = c >> 12 & 1, osxsave = c >> 27 & 1, avx = c >> 28 & 1, f16c = c >> 29 & 1;
  if (!osxsave || !avx) return 0;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool ymm_saved = (xcr0_lo & 0x6) == 0x6;     // SSE and AVX state
  const bool zmm_saved = (xcr0_lo & 0xe6) == 0xe6;   // and opmask, ZMM_Hi256, Hi16_ZMM
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b >> 5 & 1, bmi2 = b >> 8 & 1;
  const bool avx512 = (b >> 16 & 1) && (b >> 17 & 1) && (b >> 30 & 1) && (b >> 31 & 1);  // F, DQ, BW, VL
  const unsigned subleaves = a;
  if (!(ymm_saved && avx2 && fma && f16c && bmi2)) return 0;
  if (!(zmm_saved && avx512)) return 1;
  if (subleaves >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    if (a >> 5 & 1) return 3;  // AVX512_BF16
  }
  return 2;
#else
  return 0;
#endif
}

}  // namespace batchnorm::cpu
