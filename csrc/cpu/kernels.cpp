// One ISA level's kernel table: this file is compiled once per level (CMake defines BN_ISA
// and the level's -m flags), putting each copy of the primitives in its own namespace; a level
// that changes one dtype's kernels alone (avx512_bf16: BN_KERNELS_BFLOAT16_ONLY) compiles those.
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

#define BN_STR2(x) #x
#define BN_STR(x) BN_STR2(x)
#define BN_TABLE2(isa) kernel_table_##isa
#define BN_TABLE(isa) BN_TABLE2(isa)

#if defined(BN_KERNELS_BFLOAT16_ONLY)
// A level that changes one dtype's kernels (avx512_bf16): those alone; cpu/isa.cpp completes the
// table from the level below.
#define BN_BF16_KERNELS2(isa) bfloat16_kernels_##isa
#define BN_BF16_KERNELS(isa) BN_BF16_KERNELS2(isa)
extern const Kernels<bfloat16> BN_BF16_KERNELS(BN_ISA);
const Kernels<bfloat16> BN_BF16_KERNELS(BN_ISA) = BN_ISA::make<bfloat16>();
#else
extern const KernelTable BN_TABLE(BN_ISA);
const KernelTable BN_TABLE(BN_ISA) = {BN_STR(BN_ISA), BN_ISA::make<_Float16>(), BN_ISA::make<bfloat16>(),
                                      BN_ISA::make<float>(), BN_ISA::make<double>()};
#endif

}  // namespace batchnorm::cpu
