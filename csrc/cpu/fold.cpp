// CPU fold: folds an inference batch norm into the preceding conv / linear layer, in double
// (the formulas: fold_scale / fold_kernel / fold_bias in core/recipes.h), c being the
// kernel's output-channel axis. Not a hot path: one value at a time.
#include "core/backend.h"
#include "core/recipes.h"
#include "cpu/params.h"

namespace batchnorm::cpu {

void fold(const FoldParams& p, const Layout& L) {
  const int64_t C = L.channels;
  const scratch_array<double> mean = load_vector<double>(p.mean, C, 0.0);
  const scratch_array<double> var = load_vector<double>(p.var, C, 1.0);
  const scratch_array<double> weight = load_vector<double>(p.weight, C, 1.0);
  const scratch_array<double> bias = load_vector<double>(p.bias, C, 0.0);
  const scratch_array<double> conv_bias = load_vector<double>(p.conv_bias, C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    const double s = fold_scale(weight[c], var[c], p.eps);
    const void* in = static_cast<const char*>(p.kernel.data) + c * L.channel_stride[0] * dtype_size(p.kernel.dtype);
    void* out = static_cast<char*>(p.kernel_out.data) + c * L.channel_stride[1] * dtype_size(p.kernel.dtype);
    for (int64_t i = 0; i < L.count; ++i) {
      const double v = load_any(in, p.kernel.dtype, L.position_offset(0, i));
      store_any(out, p.kernel.dtype, L.position_offset(1, i), fold_kernel(v, s));
    }
    store_any(p.bias_out.data, p.bias_out.dtype, c, fold_bias(conv_bias[c], mean[c], s, bias[c]));
  }
}

}  // namespace batchnorm::cpu
