// Runtime ISA dispatch: picks the best kernel table the CPU (and OS) supports, once.
// BATCHNORM_ISA=baseline|avx2|avx512|avx512_bf16 caps the choice, to compare levels or reproduce
// a lower machine; results are bitwise identical across levels by construction.
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/ops.h"
#include "core/errors.h"
#include "cpu/kernels.h"
#include "cpu/plan.h"

namespace batchnorm::cpu {

// Each level's kernels, one object per dtype (cpu/kernels.cpp, compiled once per pair).
#define BN_DECLARE_LEVEL(isa)                          \
  extern const Kernels<_Float16> kernels_float16_##isa;  \
  extern const Kernels<bfloat16> kernels_bfloat16_##isa; \
  extern const Kernels<float> kernels_float32_##isa;     \
  extern const Kernels<double> kernels_float64_##isa;
BN_DECLARE_LEVEL(baseline)
#if defined(BN_HAVE_X86_LEVELS)
BN_DECLARE_LEVEL(avx2)
BN_DECLARE_LEVEL(avx512)
#endif
#if defined(BN_HAVE_AVX512_BF16)
// The level that changes bfloat16's kernels alone.
extern const Kernels<bfloat16> kernels_bfloat16_avx512_bf16;
#endif
#undef BN_DECLARE_LEVEL
// A level's table, its bfloat16 kernels from level bf16 (avx512_bf16 changes those alone).
#define BN_LEVEL_TABLE(name, isa, bf16)                                                                     \
  KernelTable {                                                                                             \
    name, kernels_float16_##isa, kernels_bfloat16_##bf16, kernels_float32_##isa, kernels_float64_##isa \
  }

namespace {
// The levels BATCHNORM_ISA names, lowest first: a setting caps the choice at its level.
constexpr const char* kLevels[] = {"baseline", "avx2", "avx512", "avx512_bf16"};
constexpr int kTopLevel = 3;

// The highest level BATCHNORM_ISA allows (kTopLevel when unset). Anything else is refused with
// a ValueError, not guessed at: by the Python module at import (check_environment), and for a C
// host, which runs no such check, by its first CPU op (choose, through the op's BN_ERROR_VALUE).
int isa_cap() {
  const char* cap = std::getenv("BATCHNORM_ISA");
  if (cap == nullptr || *cap == '\0') return kTopLevel;
  for (int i = 0; i <= kTopLevel; ++i)
    if (std::strcmp(cap, kLevels[i]) == 0) return i;
  std::string names;
  for (int i = 0; i <= kTopLevel; ++i) names += std::string(i ? ", " : "") + kLevels[i];
  BN_EXPECTS(false, value_error, "BATCHNORM_ISA must be one of ", names, " (or unset), got '", cap, "'");
  return kTopLevel;
}

// Throws for an unknown BATCHNORM_ISA (isa_cap), from the first op's call of active_kernels()
// (inside a parallel region for ghost groups: parallel_for carries the exception out), and a
// static initializer that threw is run again by the next call.
const KernelTable* choose() {
  [[maybe_unused]] const int cap = isa_cap();  // (unread where there are no x86 levels)
#if defined(BN_HAVE_X86_LEVELS)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#if defined(BN_HAVE_AVX512_BF16)
  // The avx512 table with bfloat16's kernels of the avx512_bf16 level, the only ones it changes.
  if (cap >= 3 && has_avx512 && __builtin_cpu_supports("avx512bf16")) {
    static const KernelTable table = BN_LEVEL_TABLE(kLevels[3], avx512, avx512_bf16);
    return &table;
  }
#endif
  if (cap >= 2 && has_avx512) {
    static const KernelTable table = BN_LEVEL_TABLE(kLevels[2], avx512, avx512);
    return &table;
  }
  if (cap >= 1 && has_avx2) {
    static const KernelTable table = BN_LEVEL_TABLE(kLevels[1], avx2, avx2);
    return &table;
  }
#endif
  static const KernelTable table = BN_LEVEL_TABLE(kLevels[0], baseline, baseline);
  return &table;
}
#undef BN_LEVEL_TABLE
}  // namespace

const KernelTable& active_kernels() {
  static const KernelTable* table = choose();
  return *table;
}

}  // namespace batchnorm::cpu

namespace batchnorm {
std::string simd_level() { return cpu::active_kernels().name; }

void check_environment() {
  cpu::isa_cap();
  cpu::stream_threshold_from_env();
}
}  // namespace batchnorm
