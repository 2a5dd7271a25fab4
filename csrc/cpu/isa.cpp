// Runtime ISA dispatch: picks the best kernel table the CPU (and OS) supports, once, among the
// levels the build compiled (all that the compiler can, unless BATCHNORM_MAX_ISA says fewer).
// BATCHNORM_ISA=baseline|avx2|avx512|avx512_bf16 caps the choice, to compare levels or reproduce
// a lower machine; results are bitwise identical across levels by construction.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/ops.h"
#include "core/errors.h"
#include "cpu/cpu_level.h"
#include "cpu/kernels.h"
#include "cpu/plan.h"

namespace batchnorm::cpu {

// Each level's kernels, one object per dtype (cpu/kernels.cpp, compiled once per pair), for the
// levels the build compiled: baseline up to BN_TOP_LEVEL (csrc/CMakeLists.txt, BATCHNORM_MAX_ISA).
#if !defined(BN_TOP_LEVEL)
#error "BN_TOP_LEVEL (the highest ISA level built, 0-3) is defined by csrc/CMakeLists.txt"
#endif
#define BN_DECLARE_LEVEL(isa)                          \
  extern const Kernels<float16> kernels_float16_##isa;  \
  extern const Kernels<bfloat16> kernels_bfloat16_##isa; \
  extern const Kernels<float> kernels_float32_##isa;     \
  extern const Kernels<double> kernels_float64_##isa;
BN_DECLARE_LEVEL(baseline)
#if BN_TOP_LEVEL >= 1
BN_DECLARE_LEVEL(avx2)
#endif
#if BN_TOP_LEVEL >= 2
BN_DECLARE_LEVEL(avx512)
#endif
#if BN_TOP_LEVEL >= 3
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
constexpr int kTopLevel = kLevelCount - 1;

// The highest level BATCHNORM_ISA allows (kTopLevel when unset). Anything else is refused with
// a ValueError, not guessed at: by the Python module at import (check_environment), and for a C
// host, which runs no such check, by its first CPU op (choose, through the op's BN_ERROR_VALUE).
int isa_cap() {
  const char* cap = std::getenv("BATCHNORM_ISA");
  if (cap == nullptr || *cap == '\0') return kTopLevel;
  for (int i = 0; i <= kTopLevel; ++i)
    if (std::strcmp(cap, kLevelNames[i]) == 0) return i;
  std::string names;
  for (int i = 0; i <= kTopLevel; ++i) names += std::string(i ? ", " : "") + kLevelNames[i];
  BN_EXPECTS(false, value_error, "BATCHNORM_ISA must be one of ", names, " (or unset), got '", cap, "'");
  return kTopLevel;
}

// The highest level that BATCHNORM_ISA allows, the CPU runs and the build compiled. Throws for
// an unknown BATCHNORM_ISA (isa_cap), from the first op's call of active_kernels() (inside a
// parallel region for ghost groups: parallel_for carries the exception out), and a static
// initializer that threw is run again by the next call.
const KernelTable* choose() {
  const int cap = isa_cap();
  const int cpu = cpu_level();
  [[maybe_unused]] const int level = std::min({cap, cpu, BN_TOP_LEVEL});  // (unread in a baseline-only build)
#if BN_TOP_LEVEL >= 3
  // The avx512 table with bfloat16's kernels of the avx512_bf16 level, the only ones it changes.
  if (level >= 3) {
    static const KernelTable table = BN_LEVEL_TABLE(kLevelNames[3], avx512, avx512_bf16);
    return &table;
  }
#endif
#if BN_TOP_LEVEL >= 2
  if (level >= 2) {
    static const KernelTable table = BN_LEVEL_TABLE(kLevelNames[2], avx512, avx512);
    return &table;
  }
#endif
#if BN_TOP_LEVEL >= 1
  if (level >= 1) {
    static const KernelTable table = BN_LEVEL_TABLE(kLevelNames[1], avx2, avx2);
    return &table;
  }
#endif
  static const KernelTable table = BN_LEVEL_TABLE(kLevelNames[0], baseline, baseline);
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
