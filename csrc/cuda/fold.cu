// CUDA fold: an inference batch norm folded into the preceding conv / linear layer, in
// double, one thread per kernel element (and one per output bias), with the formulas of
// core/recipes.h (fold_scale, fold_kernel, fold_bias). Not a hot path: kept simple.

#include "core/backend.h"
#include "cuda/common.cuh"
#include "cuda/convert.cuh"

namespace batchnorm::cuda {

namespace {

struct FoldArgs {
  const void* kernel;
  void* kernel_out;
  void* bias_out;
  DType dtype;  // of kernel, kernel_out and bias_out
  ParamRef conv_bias, mean, var, weight, bias;
  double eps;
};

__global__ void __launch_bounds__(kBlock) fold_values_kernel(const __grid_constant__ Layout L, const FoldArgs a) {
  const int64_t C = L.channels;
  const int64_t values = C * L.count;  // kernel elements; then C bias elements
  for (int64_t e = int64_t(blockIdx.x) * kBlock + threadIdx.x; e < values + C; e += int64_t(gridDim.x) * kBlock) {
    const int64_t c = e < values ? e / L.count : e - values;
    const double s = fold_scale(load_param(a.weight, c, 1.0), load_param(a.var, c, 1.0), a.eps);
    if (e < values) {
      const int64_t i = e - c * L.count;
      const double v = load_any(a.kernel, a.dtype, c * L.channel_stride[0] + L.position_offset(0, i));
      store_any(a.kernel_out, a.dtype, c * L.channel_stride[1] + L.position_offset(1, i), fold_kernel(v, s));
    } else {
      const double b = fold_bias(load_param(a.conv_bias, c, 0.0), load_param(a.mean, c, 0.0), s, load_param(a.bias, c, 0.0));
      store_any(a.bias_out, a.dtype, c, b);
    }
  }
}

}  // namespace

void fold(const FoldParams& p, const Layout& layout) {
  DeviceGuard guard(p.kernel.device.index);
  FoldArgs a;
  a.kernel = p.kernel.data;
  a.kernel_out = p.kernel_out.data;
  a.bias_out = p.bias_out.data;
  a.dtype = p.kernel.dtype;
  a.conv_bias = param_ref(p.conv_bias);
  a.mean = param_ref(p.mean);
  a.var = param_ref(p.var);
  a.weight = param_ref(p.weight);
  a.bias = param_ref(p.bias);
  a.eps = p.eps;
  const int64_t work = layout.channels * (layout.count + 1);
  if (work == 0) return;
  const unsigned grid = grid_for(std::min<int64_t>(ceil_div(work, kBlock), 65536));
  fold_values_kernel<<<grid, kBlock, 0, to_stream(p.exec.stream)>>>(layout, a);
  BN_CUDA_CHECK_LAUNCH("fold_values_kernel");
}

}  // namespace batchnorm::cuda
