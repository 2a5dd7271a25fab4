// One ISA level's kernels for one dtype: this file is compiled once per (level, dtype) pair
// (CMake defines BN_ISA, the level's -m flags and BN_KERNEL_DTYPE), putting each copy of the
// primitives in the level's namespace; cpu/isa.cpp assembles a level's table from its dtypes.
// One dtype per translation unit so that a build runs them side by side: the whole level in one
// unit took 7-11 minutes of one core, the longest job of every build.
// Internal linkage for every inline helper, so the linker never folds this level's copy
// into code that runs on a CPU without the level's instructions.
#define BN_HD static inline __attribute__((always_inline))
#define BN_CPU_INLINE static inline
#include "cpu/kernels.h"

#include <array>

#include "cpu/kernels/finalize.h"
#include "cpu/kernels/gradient.h"
#include "cpu/kernels/map.h"
#include "cpu/kernels/moments.h"

namespace batchnorm::cpu {
namespace BN_ISA {
namespace {

// The recipes in MapKind's order.
template <class T, class F>
constexpr auto for_recipes(F f) {
  return std::array{f(ForwardMap<false, Activation::none>{}), f(ForwardMap<false, Activation::relu>{}),
                    f(ForwardMap<true, Activation::none>{}),  f(ForwardMap<true, Activation::relu>{}),
                    f(BackwardMap{}),                        f(ReluGradMap{}),
                    f(IdentityMap{}),                        f(AddMap{})};
}

template <class T>
constexpr Kernels<T> make() {
  Kernels<T> k{};
  k.moments = &moments<T>;
  k.grad_sums = &grad_sums<T>;
  k.moments_channels = &moments_channels<T>;
  k.grad_sums_channels = &grad_sums_channels<T>;
  k.cl_moments = &cl_moments<T>;
  k.cl_grad_sums = &cl_grad_sums<T>;
  k.forward_finalize = &forward_finalize<T>;
  k.backward_finalize = &backward_finalize<T>;
  const auto cl_maps = for_recipes<T>([](auto r) { return &map_positions<decltype(r), T>; });
  const auto block_maps = for_recipes<T>([](auto r) { return &map_channels<decltype(r), T>; });
  static_assert(block_maps.size() == kMapKinds, "one map per MapKind");
  for (int i = 0; i < kMapKinds; ++i) {
    k.cl_map[i] = cl_maps[i];
    k.map_channels[i] = block_maps[i];
  }
  return k;
}
}  // namespace
}  // namespace BN_ISA

// kernels_<dtype>_<level> (the names cpu/isa.cpp declares; BN_KERNEL_DTYPE is a DType
// enumerator): constexpr, so constant-initialized (a compile error otherwise), readable before
// any dynamic initializer has run; the extern declaration before it keeps its linkage external.
#define BN_KERNELS_NAME2(dtype, isa) kernels_##dtype##_##isa
#define BN_KERNELS_NAME(dtype, isa) BN_KERNELS_NAME2(dtype, isa)
using KernelType = storage_t<DType::BN_KERNEL_DTYPE>;

extern const Kernels<KernelType> BN_KERNELS_NAME(BN_KERNEL_DTYPE, BN_ISA);
constexpr Kernels<KernelType> BN_KERNELS_NAME(BN_KERNEL_DTYPE, BN_ISA) = BN_ISA::make<KernelType>();

}  // namespace batchnorm::cpu
