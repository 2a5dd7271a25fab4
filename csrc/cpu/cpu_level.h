// The CPU features each ISA level needs, in one place: the run-time choice (cpu/isa.cpp) and the
// build's BATCHNORM_MAX_ISA=native probe (cpu/cpu_level_probe.cpp, run by csrc/CMakeLists.txt)
// both ask cpu_level(), so a build for "this machine" compiles exactly the levels it would run.
#pragma once

namespace batchnorm::cpu {

// Levels by number, lowest first: the names BATCHNORM_ISA and BATCHNORM_MAX_ISA take.
constexpr const char* kLevelNames[] = {"baseline", "avx2", "avx512", "avx512_bf16"};
constexpr int kLevelCount = 4;

// The highest level this CPU (and its OS, which must save the wider registers: libgcc's
// __builtin_cpu_supports checks XCR0) runs: 0 baseline, 1 avx2, 2 avx512, 3 avx512_bf16.
// avx512_bf16 is asked about only where the compiler knows the feature's name
// (BN_HAVE_AVX512_BF16, defined by the build's check); elsewhere such a CPU reports avx512.
// Internal linkage (static), and never included by the kernel objects: a copy compiled with a
// level's -m flags must not be the one the linker keeps for the dispatcher, which runs anywhere.
static inline int cpu_level() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#if defined(BN_HAVE_AVX512_BF16)
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return 3;
#endif
  return avx512 ? 2 : avx2 ? 1 : 0;
#else
  return 0;
#endif
}

}  // namespace batchnorm::cpu
