// One ISA level's kernel table: this file is compiled once per level (CMake defines BN_ISA
// and the level's -m flags), putting each copy of the primitives in its own namespace.
// Internal linkage for every inline helper, so the linker never folds this level's copy
// into code that runs on a CPU without the level's instructions.
#define BN_HD static inline __attribute__((always_inline))
#define BN_CPU_INLINE static inline
#include "cpu/kernels.h"

#include "cpu/kernels/gradient.h"
#include "cpu/kernels/map.h"
#include "cpu/kernels/moments.h"

namespace batchnorm::cpu {
namespace BN_ISA {
namespace {

// Calls f with the recipe type of `kind` (one instantiation per recipe, chosen per call).
template <class F>
static inline __attribute__((always_inline)) void with_recipe(MapKind kind, F&& f) {
  switch (kind) {
    case MapKind::normalize: return f(ForwardMap<false, Activation::none>{});
    case MapKind::normalize_relu: return f(ForwardMap<false, Activation::relu>{});
    case MapKind::normalize_add: return f(ForwardMap<true, Activation::none>{});
    case MapKind::normalize_add_relu: return f(ForwardMap<true, Activation::relu>{});
    case MapKind::backward_dx: return f(BackwardMap{});
    case MapKind::relu_grad: return f(ReluGradMap{});
    case MapKind::copy: return f(IdentityMap{});
  }
}

template <class T>
void map_any(MapKind kind, const T* const* in, T* out, const Layout& L, int64_t begin, int64_t end,
             const acc_t<T>* k, bool nt) {
  with_recipe(kind, [&](auto r) { map_block<decltype(r), T>(in, out, L, begin, end, k, nt); });
}

template <class T>
void cl_map_any(MapKind kind, const T* const* in, T* out, const Layout& L, int64_t p0, int64_t p1,
                const acc_t<T>* const* k, bool nt) {
  with_recipe(kind, [&](auto r) { map_positions<decltype(r), T>(in, out, L, p0, p1, k, nt); });
}

template <class T>
constexpr Kernels<T> make() {
  return Kernels<T>{&moments<T>, &map_any<T>, &grad_sums<T>, &cl_moments<T>, &cl_map_any<T>, &cl_grad_sums<T>};
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
