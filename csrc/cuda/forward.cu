// CUDA forward passes. Training: the moments reduction of statistics.cu, whose finalize also
// computes invstd, the per-channel scale and shift and the running-statistics update on the
// GPU, then one elementwise pass (map.cuh) of the recipe: normalize, fused with a residual
// add and a ReLU when asked. Inference: a per-channel kernel for scale and shift, then the
// same pass. y may be x itself (each thread reads a value before writing it).
#include "core/backend.h"
#include "cuda/common.cuh"
#include "cuda/convert.cuh"
#include "cuda/map.cuh"
#include "cuda/moments.cuh"
#include "cuda/walk.cuh"

namespace batchnorm::cuda {

namespace {

// Inference coefficients: forward_coefficients of the given statistics, as on the CPU.
template <class A>
__global__ void __launch_bounds__(kBlock)
    inference_coefficients_kernel(int64_t channels, ParamRef mean_in, ParamRef var_in, ParamRef weight, ParamRef bias,
                                  double eps, A* __restrict__ mean, A* __restrict__ scale, A* __restrict__ shift) {
  for (int64_t c = int64_t(blockIdx.x) * kBlock + threadIdx.x; c < channels; c += int64_t(gridDim.x) * kBlock) {
    const double var = load_param(var_in, c, 1.0);
    const A w = static_cast<A>(load_param(weight, c, 1.0));
    ForwardCoefficients<A> k =
        forward_coefficients<A>(load_param(mean_in, c, 0.0), var, eps, w, static_cast<A>(load_param(bias, c, 0.0)));
    if (forward_coefficients_overflowed(k)) widen_forward_coefficients(k, var, eps, w);
    mean[c] = k.mean;
    scale[c] = k.scale;
    shift[c] = k.shift;
  }
}

// Enqueues y = act(normalize(x) [+ residual]) with per-channel (C,) coefficient arrays
// already on the device; the recipe follows from the params.
template <class T, class P>
void normalize_all(const P& p, const Layout& L, const acc_t<T>* mean, const acc_t<T>* scale, const acc_t<T>* shift,
                   cudaStream_t stream) {
  using A = acc_t<T>;
  const bool relu = p.activation == Activation::relu;
  auto run = [&](auto residual, auto act) {
    const ForwardOp<A, decltype(residual)::value, decltype(act)::value> op{mean, scale, shift};
    launch_map<T>(p.x, p.residual, p.y, L, op, stream);
  };
  using Relu = std::integral_constant<Activation, Activation::relu>;
  using None = std::integral_constant<Activation, Activation::none>;
  if (p.residual.defined()) {
    if (relu) run(std::true_type{}, Relu{});
    else run(std::true_type{}, None{});
  } else {
    if (relu) run(std::false_type{}, Relu{});
    else run(std::false_type{}, None{});
  }
}

}  // namespace

void forward_training(const ForwardTrainingParams& p, const Layout& layout) {
  DeviceGuard guard(p.x.device.index);
  const cudaStream_t stream = to_stream(p.exec.stream);
  dispatch_dtype(p.x.dtype, "x", [&](auto d) {
    using T = storage_t<decltype(d)::value>;
    using A = acc_t<T>;
    const int64_t C = layout.channels;
    Workspace ws(p.x.device.index, stream, p.exec.scratch);
    A* scale = ws.alloc<A>(C);
    A* shift = ws.alloc<A>(C);
    MomentsOutputs out;
    out.mean = p.saved_mean.data;
    out.invstd = p.saved_invstd.data;
    out.scale = scale;
    out.shift = shift;
    out.weight = param_ref(p.weight);
    out.bias = param_ref(p.bias);
    out.running_mean = param_ref(p.running_mean);
    out.running_var = param_ref(p.running_var);
    out.eps = p.eps;
    out.momentum = p.momentum;
    out.running = RunningOptions{p.running_var_unbiased, p.skip_nonfinite, dtype_overflow(p.running_mean.dtype),
                                 dtype_overflow(p.running_var.dtype)};
    if (p.renorm) {
      out.rmax = p.renorm_rmax;
      out.dmax = p.renorm_dmax;
      out.renorm_r = p.renorm_r.data;
      out.renorm_d = p.renorm_d.data;
    }
    out.mean64 = p.moments_mean.ptr<double>();
    out.var64 = p.moments_var.ptr<double>();
    if (p.batch_mean.defined())
      given_moments(p.x.dtype, param_ref(p.batch_mean), param_ref(p.batch_var), C, p.batch_count, out, stream);
    else
      reduce_moments(p.x, layout, out, stream, p.exec.scratch);
    // A shard may be empty when the statistics are given: outputs and running update only.
    if (layout.count > 0) normalize_all<T>(p, layout, p.saved_mean.ptr<const A>(), scale, shift, stream);
  });
}

void forward_inference(const ForwardInferenceParams& p, const Layout& layout) {
  DeviceGuard guard(p.x.device.index);
  const cudaStream_t stream = to_stream(p.exec.stream);
  dispatch_dtype(p.x.dtype, "x", [&](auto d) {
    using T = storage_t<decltype(d)::value>;
    using A = acc_t<T>;
    const int64_t C = layout.channels;
    Workspace ws(p.x.device.index, stream, p.exec.scratch);
    A* mean = ws.alloc<A>(C);
    A* scale = ws.alloc<A>(C);
    A* shift = ws.alloc<A>(C);
    inference_coefficients_kernel<A><<<grid_for(ceil_div(C, kBlock)), kBlock, 0, stream>>>(
        C, param_ref(p.mean), param_ref(p.var), param_ref(p.weight), param_ref(p.bias), p.eps, mean, scale, shift);
    BN_CUDA_CHECK_LAUNCH("inference_coefficients_kernel");
    normalize_all<T>(p, layout, mean, scale, shift, stream);
  });
}

}  // namespace batchnorm::cuda
