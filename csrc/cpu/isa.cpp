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

extern const KernelTable kernel_table_baseline;
#if defined(BN_HAVE_X86_LEVELS)
extern const KernelTable kernel_table_avx2;
extern const KernelTable kernel_table_avx512;
#endif
#if defined(BN_HAVE_AVX512_BF16)
extern const Kernels<bfloat16> bfloat16_kernels_avx512_bf16;
#endif

namespace {
// The level BATCHNORM_ISA asks for ("" when unset). Anything else is refused with a ValueError,
// not guessed at: by the Python module at import (check_environment), and for a C host, which
// runs no such check, by its first CPU op (choose, through the op's BN_ERROR_VALUE).
std::string isa_setting() {
  const char* cap = std::getenv("BATCHNORM_ISA");
  const std::string want = cap ? cap : "";
  BN_EXPECTS(want.empty() || want == "baseline" || want == "avx2" || want == "avx512" || want == "avx512_bf16",
             value_error, "BATCHNORM_ISA must be one of baseline, avx2, avx512, avx512_bf16 (or unset), got '", want,
             "'");
  return want;
}

// Throws for an unknown BATCHNORM_ISA (isa_setting). The first call of active_kernels() is an
// op's, on the calling thread before any parallel region, and a static initializer that threw
// is run again by the next call.
const KernelTable* choose() {
  const std::string want = isa_setting();
#if defined(BN_HAVE_X86_LEVELS)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#if defined(BN_HAVE_AVX512_BF16)
  // The avx512 table with bfloat16's kernels of the avx512_bf16 level, the only ones it changes.
  if (has_avx512 && __builtin_cpu_supports("avx512bf16") && (want.empty() || want == "avx512_bf16")) {
    static const KernelTable table = [] {
      KernelTable t = kernel_table_avx512;
      t.name = "avx512_bf16";
      t.bf16 = bfloat16_kernels_avx512_bf16;
      return t;
    }();
    return &table;
  }
#endif
  if (has_avx512 && (want.empty() || want == "avx512" || want == "avx512_bf16")) return &kernel_table_avx512;
  if (has_avx2 && want != "baseline") return &kernel_table_avx2;
#endif
  return &kernel_table_baseline;
}
}  // namespace

const KernelTable& active_kernels() {
  static const KernelTable* table = choose();
  return *table;
}

}  // namespace batchnorm::cpu

namespace batchnorm {
std::string simd_level() { return cpu::active_kernels().name; }

void check_environment() {
  cpu::isa_setting();
  cpu::stream_threshold_from_env();
}
}  // namespace batchnorm
