// CUDA elementwise passes the op layer composes fused ops from (core/backend.h): the ReLU
// gradient and the copy of the fused backward and ghost batch norm's sums, on map.cuh's executor.
#include "core/backend.h"
#include "cuda/common.cuh"
#include "cuda/map.cuh"

namespace batchnorm::cuda {

void elementwise(const ElementwiseParams& p, const Layout& layout) {
  if (layout.count == 0) return;
  DeviceGuard guard(p.in0.device.index);
  const cudaStream_t stream = to_stream(p.exec.stream);
  dispatch_dtype(p.in0.dtype, "dy", [&](auto d) {
    using T = storage_t<decltype(d)::value>;
    using A = acc_t<T>;
    if (p.kind == ElementwiseKind::relu_grad)
      launch_map<T>(p.in0, p.in1, p.out, layout, PlainMapOp<A, ReluGradMap>{}, stream);
    else if (p.kind == ElementwiseKind::add)
      launch_map<T>(p.in0, p.in1, p.out, layout, PlainMapOp<A, AddMap>{}, stream);
    else
      launch_map<T>(p.in0, p.in1, p.out, layout, PlainMapOp<A, IdentityMap>{}, stream);
  });
}

}  // namespace batchnorm::cuda
