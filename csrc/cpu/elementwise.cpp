// CPU elementwise passes the op layer composes fused ops from (core/backend.h): the ReLU
// gradient and the copy of the fused backward and ghost batch norm's sums, on the same executor as every other map.
#include "core/backend.h"
#include "cpu/params.h"
#include "cpu/plan.h"

namespace batchnorm::cpu {

void elementwise(const ElementwiseParams& p, const Layout& L) {
  dispatch_dtype(p.in0.dtype, "dy", [&](auto d) {
    using T = storage_t<decltype(d)::value>;
    MapPass<T> m;
    m.kind = p.kind == ElementwiseKind::relu_grad ? MapKind::relu_grad
             : p.kind == ElementwiseKind::add     ? MapKind::add
                                                  : MapKind::copy;
    m.in[0] = p.in0.ptr<const T>();
    m.in[1] = p.in1.defined() ? p.in1.ptr<const T>() : nullptr;
    m.out = p.out.ptr<T>();
    const int arrays = map_inputs(m.kind) + 1;
    m.nt = stream_output(arrays * L.count * L.channels * static_cast<int64_t>(sizeof(T)));
    m.memory_order = true;
    if (L.count > 0) map_all(kernels_for<T>(), m, L, make_plan(L, arrays * sizeof(T)));
  });
}

}  // namespace batchnorm::cpu
