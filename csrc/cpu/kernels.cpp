// One ISA level's kernel table: this file is compiled once per level (CMake defines BN_ISA
// and the level's -m flags), putting each copy of the primitives in its own namespace.
// Internal linkage for every inline helper, so the linker never folds this level's copy
// into code that runs on a CPU without the level's instructions.
#define BN_HD static inline
#define BN_CPU_INLINE static inline
#include "cpu/kernels.h"

#include "cpu/kernels/gradient.h"
#include "cpu/kernels/moments.h"
#include "cpu/kernels/normalize.h"

namespace batchnorm::cpu {
namespace BN_ISA {
namespace {
template <class T>
constexpr Kernels<T> make() {
  return Kernels<T>{&moments<T>,    &normalize_block<T>, &grad_sums<T>,    &grad_apply<T>,
                    &cl_moments<T>, &cl_normalize<T>,    &cl_grad_sums<T>, &cl_grad_apply<T>};
}
}  // namespace
}  // namespace BN_ISA

#define BN_STR2(x) #x
#define BN_STR(x) BN_STR2(x)
#define BN_TABLE2(isa) kernel_table_##isa
#define BN_TABLE(isa) BN_TABLE2(isa)

extern const KernelTable BN_TABLE(BN_ISA);
const KernelTable BN_TABLE(BN_ISA) = {BN_STR(BN_ISA), BN_ISA::make<_Float16>(), BN_ISA::make<bfloat16>(),
                                      BN_ISA::make<float>(), BN_ISA::make<double>()};

}  // namespace batchnorm::cpu
