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
    const int arrays = map_inputs(m.kind) + 1;
    m.nt = stream_output(arrays * L.count * L.channels * static_cast<int64_t>(sizeof(T)));
    m.memory_order = true;
    if (L.count > 0) map_all(kernels_for<T>(), m, L, make_plan<T>(L, arrays * sizeof(T)));
  });
}

}  // namespace batchnorm::cpu
