// CUDA forward passes. Training: the moments reduction of statistics.cu, whose finalize also
// computes invstd, the per-channel scale and shift and the running-statistics update on the
// GPU, then one elementwise normalize. Inference: a per-channel kernel for scale and shift,
// then the same normalize. y may be x itself (each thread reads a value before writing it).
#include "core/backend.h"
#include "cuda/common.cuh"
#include "cuda/convert.cuh"
#include "cuda/dense.cuh"
#include "cuda/moments.cuh"
#include "cuda/walk.cuh"

namespace batchnorm::cuda {

namespace {

// y = normalize(x, mean[c], scale[c], shift[c]) over arrays 0 (x) and 1 (y) of the layout.
template <class T, int W>
__global__ void __launch_bounds__(kBlock, 2)
    cf_normalize_kernel(const __grid_constant__ Layout L, const T* x, T* y, CfPlan plan, const acc_t<T>* __restrict__ mean,
                        const acc_t<T>* __restrict__ scale, const acc_t<T>* __restrict__ shift) {
  using A = acc_t<T>;
  constexpr int U = kUnroll;  // one array read
  const CfGeom<2> g(L, W);
  for (int64_t w = blockIdx.x; w < plan.items; w += gridDim.x) {
    const int64_t c = w / plan.splits;
    const int64_t b0 = (w - c * plan.splits) * plan.chunk;
    const int64_t b1 = min(L.count, b0 + plan.chunk);
    const A m = mean[c], k = scale[c], b = shift[c];
    cf_walk<2, W, U>(L, g, c, b0, b1, [&](const int64_t (&off)[U][2], int n) {
      Pack<T, W> v[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u < n) v[u] = *reinterpret_cast<const Pack<T, W>*>(x + off[u][0]);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u < n) {
          Pack<T, W> o;
#pragma unroll
          for (int j = 0; j < W; ++j) o.v[j] = store<T>(normalize<A>(load(v[u].v[j]), m, k, b));
          *reinterpret_cast<Pack<T, W>*>(y + off[u][1]) = o;
        }
    });
  }
}

template <class T, int W>
__global__ void __launch_bounds__(kBlock, 2)
    cl_normalize_kernel(const __grid_constant__ Layout L, const T* x, T* y, ClPlan plan, const acc_t<T>* __restrict__ mean,
                        const acc_t<T>* __restrict__ scale, const acc_t<T>* __restrict__ shift) {
  using A = acc_t<T>;
  constexpr int U = kUnroll;  // one array read
  const ClGeom<2> g(L);
  const int lane = static_cast<int>(threadIdx.x) % plan.lanes;
  const int row = static_cast<int>(threadIdx.x) / plan.lanes;
  if (row >= plan.rows) return;  // no block-wide synchronization below
  for (int64_t w = blockIdx.x; w < plan.items; w += gridDim.x) {
    const int64_t s = w / plan.tiles;
    const int64_t c = ((w - s * plan.tiles) * plan.lanes + lane) * W;
    if (c >= L.channels) continue;  // W divides C when W > 1
    A m[W], k[W], b[W];
#pragma unroll
    for (int j = 0; j < W; ++j) m[j] = mean[c + j], k[j] = scale[c + j], b[j] = shift[c + j];
    const int64_t p0 = cl_split_begin(L.count, plan.splits, s);
    const int64_t p1 = cl_split_begin(L.count, plan.splits, s + 1);
    cl_walk<2, U>(L, g, p0, p1, row, plan.rows, [&](const int64_t (&off)[U][2], int n) {
      Pack<T, W> v[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u < n) v[u] = *reinterpret_cast<const Pack<T, W>*>(x + off[u][0] + c);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u < n) {
          Pack<T, W> o;
#pragma unroll
          for (int j = 0; j < W; ++j) o.v[j] = store<T>(normalize<A>(load(v[u].v[j]), m[j], k[j], b[j]));
          *reinterpret_cast<Pack<T, W>*>(y + off[u][1] + c) = o;
        }
    });
  }
}

// normalize() with channel c's coefficients, for dense_kernel.
template <class A>
struct NormalizeOp {
  static constexpr int kInputs = 1;
  const A* mean;
  const A* scale;
  const A* shift;
  __device__ __forceinline__ A operator()(uint32_t c, A v, A) const { return normalize<A>(v, mean[c], scale[c], shift[c]); }
};

// Inference coefficients, as the CPU computes them: scale = (A)(1 / sqrt(var + eps)) * weight.
template <class A>
__global__ void __launch_bounds__(kBlock)
    inference_coefficients_kernel(int64_t channels, ParamRef mean_in, ParamRef var_in, ParamRef weight, ParamRef bias,
                                  double eps, A* __restrict__ mean, A* __restrict__ scale, A* __restrict__ shift) {
  for (int64_t c = int64_t(blockIdx.x) * kBlock + threadIdx.x; c < channels; c += int64_t(gridDim.x) * kBlock) {
    mean[c] = static_cast<A>(load_param(mean_in, c, 0.0));
    scale[c] = static_cast<A>(inverse_std<double>(load_param(var_in, c, 1.0), eps)) *
               static_cast<A>(load_param(weight, c, 1.0));
    shift[c] = static_cast<A>(load_param(bias, c, 0.0));
  }
}

// Enqueues y = normalize(x) with per-channel (C,) coefficient arrays already on the device.
template <class T>
void normalize_all(const TensorView& x, const TensorView& y, const Layout& L, const acc_t<T>* mean,
                   const acc_t<T>* scale, const acc_t<T>* shift, cudaStream_t stream) {
  const T* xd = x.ptr<const T>();
  T* yd = y.ptr<T>();
  const void* arrays[] = {x.data, y.data};
  if (const DensePlan dense = dense_plan(L, arrays, 2, kVecWidth<T>); dense.ok) {
    launch_dense<T>(dense, xd, nullptr, yd, NormalizeOp<acc_t<T>>{mean, scale, shift}, stream);
    return;
  }
  if (L.channels_last()) {
    with_width<T>(cl_packable(L, arrays, 2, kVecWidth<T>), [&](auto width) {
      constexpr int W = decltype(width)::value;
      const ClPlan plan = cl_plan(L, W);
      cl_normalize_kernel<T, W><<<grid_for(plan.items), kBlock, 0, stream>>>(L, xd, yd, plan, mean, scale, shift);
      BN_CUDA_CHECK_LAUNCH("cl_normalize_kernel");
    });
  } else {
    with_width<T>(cf_packable(L, arrays, 2, kVecWidth<T>), [&](auto width) {
      constexpr int W = decltype(width)::value;
      const CfPlan plan = cf_plan(L, W);
      cf_normalize_kernel<T, W><<<grid_for(plan.items), kBlock, 0, stream>>>(L, xd, yd, plan, mean, scale, shift);
      BN_CUDA_CHECK_LAUNCH("cf_normalize_kernel");
    });
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
    if (p.batch_mean.defined())
      given_moments(p.x.dtype, param_ref(p.batch_mean), param_ref(p.batch_var), C, p.batch_count, out, stream);
    else
      reduce_moments(p.x, layout, out, stream, p.exec.scratch);
    // A shard may be empty when the statistics are given: outputs and running update only.
    if (layout.count > 0) normalize_all<T>(p.x, p.y, layout, p.saved_mean.ptr<const A>(), scale, shift, stream);
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
    normalize_all<T>(p.x, p.y, layout, mean, scale, shift, stream);
  });
}

}  // namespace batchnorm::cuda
