// CPU elementwise passes the op layer composes fused ops from (core/backend.h): the ReLU
// gradient and the copy of the fused backward and ghost batch norm's sums, on the same executor as every other map.
#include "core/backend.h"
#include "cpu/params.h"
#include "cpu/plan.h"

namespace batchnorm::cpu {

void elementwise(const ElementwiseParams& p, const Layout& L) {
  dispatch_dtype(p.in0.dtype, "dy", [&](auto d) {
    using T = storage_t<decltype(d)::value>;
    MapPass<T> m = elementwise_pass<T>(p);
    if (L.count == 0) return;
    const Plan plan = make_plan<T>(L, (map_inputs(m.kind) + 1) * sizeof(T));
    m.nt = plan.from_memory;
    m.memory_order = true;
    map_all(kernels_for<T>(), m, L, plan);
  });
}

}  // namespace batchnorm::cpu
