// CUDA backward: one split reduction of (sum dy, sum dy * (x - mean)) per channel with the
// same work items and fixed merge order as the statistics, a warp-per-channel finalize that
// writes dweight, dbias and the coefficients of recipes.h's backward_dx, then the elementwise dx.
// dx may be dy or x itself (each thread reads its values before writing them).
// backward_reduce / backward_elemt are the reduction and the elementwise pass taken apart.
#include "core/backend.h"
#include "cuda/common.cuh"
#include "cuda/convert.cuh"
#include "cuda/map.cuh"
#include "cuda/reduce.cuh"
#include "cuda/walk.cuh"

namespace batchnorm::cuda {

namespace {

// Arrays of the layout: 0 dy, 1 x, 2 dx.
template <class T, int W>
__global__ void __launch_bounds__(kBlock, 2)
    cf_grad_sums_kernel(const __grid_constant__ Layout L, const T* __restrict__ dy, const T* __restrict__ x,
                        ParamRef saved_mean, CfPlan plan, GradPartial* __restrict__ part) {
  using A = acc_t<T>;
  constexpr int U = kUnroll / 2;  // two arrays read
  using Merge = BlockMerge<GradPartial, AddGradOp>;
  __shared__ typename Merge::TempStorage tmp;
  const CfGeom<2> g(L, W);
  for (int64_t w = blockIdx.x; w < plan.items; w += gridDim.x) {
    const int64_t c = w / plan.splits;
    const int64_t b0 = (w - c * plan.splits) * plan.chunk;
    const int64_t b1 = min(L.count, b0 + plan.chunk);
    const A mean = static_cast<A>(load_param(saved_mean, c, 0.0));
    GradSums<A, 1> acc;
    cf_walk<2, W, U>(L, g, c, b0, b1, [&](const int64_t (&off)[U][2], int n) {
      Pack<T, W> gv[U], xv[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u < n) {
          gv[u] = *reinterpret_cast<const Pack<T, W>*>(dy + off[u][0]);
          xv[u] = *reinterpret_cast<const Pack<T, W>*>(x + off[u][1]);
        }
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u < n) {
#pragma unroll
          for (int j = 0; j < W; ++j) acc.add(0, load(gv[u].v[j]), load(xv[u].v[j]), mean);
        }
      acc.counted(n * W);
    });
    acc.flush();
    const GradPartial r = Merge::run(tmp, acc.partial(0));
    if (threadIdx.x == 0) part[w] = r;  // part[c * splits + s]
    __syncthreads();
  }
}

template <class T, int W>
__global__ void __launch_bounds__(kBlock, 2)
    cl_grad_sums_kernel(const __grid_constant__ Layout L, const T* __restrict__ dy, const T* __restrict__ x,
                        ParamRef saved_mean, ClPlan plan, GradPartial* __restrict__ part) {
  using A = acc_t<T>;
  constexpr int U = kUnroll / 2;  // two arrays read
  __shared__ GradPartial sm[kBlock];
  const ClGeom<2> g(L);
  const int lane = static_cast<int>(threadIdx.x) % plan.lanes;
  const int row = static_cast<int>(threadIdx.x) / plan.lanes;
  for (int64_t w = blockIdx.x; w < plan.items; w += gridDim.x) {
    const int64_t s = w / plan.tiles;
    const int64_t c = ((w - s * plan.tiles) * plan.lanes + lane) * W;
    const bool active = row < plan.rows && c < L.channels;  // W divides C when W > 1
    const int64_t p0 = cl_split_begin(L.count, plan.splits, s);
    const int64_t p1 = cl_split_begin(L.count, plan.splits, s + 1);
    GradSums<A, W> acc;
    if (active) {
      A mean[W];
#pragma unroll
      for (int j = 0; j < W; ++j) mean[j] = static_cast<A>(load_param(saved_mean, c + j, 0.0));
      cl_walk<2, U>(L, g, p0, p1, row, plan.rows, [&](const int64_t (&off)[U][2], int n) {
        Pack<T, W> gv[U], xv[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (u < n) {
            gv[u] = *reinterpret_cast<const Pack<T, W>*>(dy + off[u][0] + c);
            xv[u] = *reinterpret_cast<const Pack<T, W>*>(x + off[u][1] + c);
          }
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (u < n) {
#pragma unroll
            for (int j = 0; j < W; ++j) acc.add(j, load(gv[u].v[j]), load(xv[u].v[j]), mean[j]);
          }
        acc.counted(n);
      });
    }
    acc.flush();
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const GradPartial r =
          merge_rows(sm, active ? acc.partial(j) : GradPartial{}, active, row, plan.lanes, plan.rows, AddGradOp{});
      if (active && row == 0) part[s * L.channels + c + j] = r;  // part[s * C + c]
    }
  }
}

// Channel c's dweight = sum(dy * (x - mean)) * invstd and dbias = sum(dy), exactly as the CPU
// computes them.
template <class A>
__device__ __forceinline__ void store_param_grads(int64_t c, const GradPartial& sums, ParamRef saved_invstd,
                                                  A* __restrict__ dweight, A* __restrict__ dbias) {
  const ParamGrads<A> g = param_grads<A>(sums.dy, sums.dy_xmu, static_cast<A>(load_param(saved_invstd, c, 1.0)));
  dweight[c] = g.dweight;
  dbias[c] = g.dbias;
}

// The coefficients of backward_dx from channel c's sums over `count` values, as the CPU forms them.
template <class A>
__device__ __forceinline__ BackwardCoefficients<A> grad_coefficients(int64_t c, const GradPartial& sums,
                                                                     int64_t count, ParamRef saved_mean,
                                                                     ParamRef saved_invstd, ParamRef weight) {
  const A invstd = static_cast<A>(load_param(saved_invstd, c, 1.0));
  BackwardCoefficients<A> k = backward_coefficients<A>(sums.dy, sums.dy_xmu, static_cast<double>(count),
                                                       static_cast<A>(load_param(saved_mean, c, 0.0)), invstd,
                                                       static_cast<A>(load_param(weight, c, 1.0)));
  widen_backward_coefficients<A>(k, sums.dy, sums.dy_xmu, static_cast<double>(count), invstd);
  return k;
}

// One warp per channel: the sums, dweight, dbias and the coefficients of backward_dx; with
// batch renorm's r and d (renorm_r.data set), dweight = r * sum(dy * x_hat) + d * sum(dy) and
// dx takes weight * r, as on the CPU.
template <class A>
__global__ void __launch_bounds__(kBlock)
    grad_finalize_kernel(Partials<GradPartial> part, int64_t channels, int64_t count, ParamRef saved_mean,
                         ParamRef saved_invstd, ParamRef weight, ParamRef renorm_r, ParamRef renorm_d,
                         A* __restrict__ dweight, A* __restrict__ dbias, BackwardCoefficients<A>* __restrict__ coef) {
  for (int64_t c = first_warp_channel(); c < channels; c += warp_channel_stride()) {
    const GradPartial sums = warp_merge(part, c, AddGradOp{});
    if ((threadIdx.x & 31u) != 0) continue;
    if (!renorm_r.data) {
      store_param_grads<A>(c, sums, saved_invstd, dweight, dbias);
      coef[c] = grad_coefficients<A>(c, sums, count, saved_mean, saved_invstd, weight);
      continue;
    }
    const Renorm<A> rd{static_cast<A>(load_param(renorm_r, c, 1.0)), static_cast<A>(load_param(renorm_d, c, 0.0))};
    const A invstd = static_cast<A>(load_param(saved_invstd, c, 1.0));
    const ParamGrads<A> g = renorm_param_grads<A>(param_grads<A>(sums.dy, sums.dy_xmu, invstd), rd);
    dweight[c] = g.dweight;
    dbias[c] = g.dbias;
    BackwardCoefficients<A> k = backward_coefficients<A>(sums.dy, sums.dy_xmu, static_cast<double>(count),
                                                         static_cast<A>(load_param(saved_mean, c, 0.0)), invstd,
                                                         static_cast<A>(load_param(weight, c, 1.0)) * rd.r);
    widen_backward_coefficients<A>(k, sums.dy, sums.dy_xmu, static_cast<double>(count), invstd);
    coef[c] = k;
  }
}

// backward_reduce's finalize: the sums in float64 for the caller to add up, and this
// shard's dweight and dbias.
template <class A>
__global__ void __launch_bounds__(kBlock)
    grad_reduce_kernel(Partials<GradPartial> part, int64_t channels, ParamRef saved_invstd, double* __restrict__ sum_dy,
                       double* __restrict__ sum_dy_xmu, A* __restrict__ dweight, A* __restrict__ dbias) {
  for (int64_t c = first_warp_channel(); c < channels; c += warp_channel_stride()) {
    const GradPartial sums = warp_merge(part, c, AddGradOp{});
    if ((threadIdx.x & 31u) != 0) continue;
    sum_dy[c] = sums.dy;
    sum_dy_xmu[c] = sums.dy_xmu;
    store_param_grads<A>(c, sums, saved_invstd, dweight, dbias);
  }
}

// backward_elemt's coefficients from sums given by the caller (added up over every shard).
template <class A>
__global__ void __launch_bounds__(kBlock)
    given_grad_coefficients_kernel(int64_t channels, int64_t count, ParamRef sum_dy, ParamRef sum_dy_xmu,
                                   ParamRef saved_mean, ParamRef saved_invstd, ParamRef weight,
                                   BackwardCoefficients<A>* __restrict__ coef) {
  for (int64_t c = int64_t(blockIdx.x) * kBlock + threadIdx.x; c < channels; c += int64_t(gridDim.x) * kBlock) {
    const GradPartial sums{load_param(sum_dy, c, 0.0), load_param(sum_dy_xmu, c, 0.0)};
    coef[c] = grad_coefficients<A>(c, sums, count, saved_mean, saved_invstd, weight);
  }
}

// Enqueues the split reduction of (sum dy, sum dy * (x - mean)); returns where the partials are.
template <class T>
Partials<GradPartial> launch_grad_sums(const TensorView& dy_t, const TensorView& x_t, ParamRef saved_mean,
                                       const Layout& L, Workspace& ws, cudaStream_t stream) {
  const T* dy = dy_t.ptr<const T>();
  const T* x = x_t.ptr<const T>();
  const void* inputs[] = {dy_t.data, x_t.data};
  Partials<GradPartial> part;
  if (L.channels_last()) {
    with_width<T>(cl_packable(L, inputs, 2, kVecWidth<T>), [&](auto width) {
      constexpr int W = decltype(width)::value;
      const ClPlan plan = cl_plan(L, W);
      part = {ws.alloc<GradPartial>(plan.splits * L.channels), plan.splits, 1, L.channels};
      cl_grad_sums_kernel<T, W><<<grid_for(plan.items), kBlock, 0, stream>>>(L, dy, x, saved_mean, plan, part.data);
      BN_CUDA_CHECK_LAUNCH("cl_grad_sums_kernel");
    });
  } else {
    with_width<T>(cf_packable(L, inputs, 2, kVecWidth<T>), [&](auto width) {
      constexpr int W = decltype(width)::value;
      const CfPlan plan = cf_plan(L, W);
      part = {ws.alloc<GradPartial>(plan.items), plan.splits, plan.splits, 1};
      cf_grad_sums_kernel<T, W><<<grid_for(plan.items), kBlock, 0, stream>>>(L, dy, x, saved_mean, plan, part.data);
      BN_CUDA_CHECK_LAUNCH("cf_grad_sums_kernel");
    });
  }
  return part;
}

// Enqueues dx = backward_dx(dy, x) with per-channel coefficients already on the device.
template <class T>
void launch_grad_input(const TensorView& dy, const TensorView& x, const TensorView& dx, const Layout& L,
                       const BackwardCoefficients<acc_t<T>>* coef, cudaStream_t stream) {
  launch_map<T>(dy, x, dx, L, GradInputOp<acc_t<T>>{coef}, stream);
}

template <class T>
void backward_typed(const BackwardParams& p, const Layout& L, cudaStream_t stream) {
  using A = acc_t<T>;
  const ParamRef saved_mean = param_ref(p.saved_mean);
  Workspace ws(p.x.device.index, stream, p.exec.scratch);
  auto* coef = ws.alloc<BackwardCoefficients<A>>(L.channels);
  const Partials<GradPartial> part = launch_grad_sums<T>(p.dy, p.x, saved_mean, L, ws, stream);
  grad_finalize_kernel<A><<<warp_grid(L.channels), kBlock, 0, stream>>>(
      part, L.channels, L.count, saved_mean, param_ref(p.saved_invstd), param_ref(p.weight), param_ref(p.renorm_r),
      param_ref(p.renorm_d), p.dweight.ptr<A>(), p.dbias.ptr<A>(), coef);
  BN_CUDA_CHECK_LAUNCH("grad_finalize_kernel");
  launch_grad_input<T>(p.dy, p.x, p.dx, L, coef, stream);
}

template <class T>
void backward_reduce_typed(const BackwardReduceParams& p, const Layout& L, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t C = L.channels;
  if (L.count == 0) {  // an empty shard contributes nothing: zero bits are 0.0 in every dtype
    BN_CUDA_CHECK(cudaMemsetAsync(p.sum_dy.data, 0, C * sizeof(double), stream));
    BN_CUDA_CHECK(cudaMemsetAsync(p.sum_dy_xmu.data, 0, C * sizeof(double), stream));
    BN_CUDA_CHECK(cudaMemsetAsync(p.dweight.data, 0, C * sizeof(A), stream));
    BN_CUDA_CHECK(cudaMemsetAsync(p.dbias.data, 0, C * sizeof(A), stream));
    return;
  }
  Workspace ws(p.x.device.index, stream, p.exec.scratch);
  const Partials<GradPartial> part = launch_grad_sums<T>(p.dy, p.x, param_ref(p.mean), L, ws, stream);
  grad_reduce_kernel<A><<<warp_grid(C), kBlock, 0, stream>>>(part, C, param_ref(p.invstd), p.sum_dy.ptr<double>(),
                                                             p.sum_dy_xmu.ptr<double>(), p.dweight.ptr<A>(),
                                                             p.dbias.ptr<A>());
  BN_CUDA_CHECK_LAUNCH("grad_reduce_kernel");
}

template <class T>
void backward_elemt_typed(const BackwardElemtParams& p, const Layout& L, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t C = L.channels;
  Workspace ws(p.x.device.index, stream, p.exec.scratch);
  auto* coef = ws.alloc<BackwardCoefficients<A>>(C);
  given_grad_coefficients_kernel<A><<<grid_for(ceil_div(C, kBlock)), kBlock, 0, stream>>>(
      C, p.count, param_ref(p.sum_dy), param_ref(p.sum_dy_xmu), param_ref(p.mean), param_ref(p.invstd),
      param_ref(p.weight), coef);
  BN_CUDA_CHECK_LAUNCH("given_grad_coefficients_kernel");
  launch_grad_input<T>(p.dy, p.x, p.dx, L, coef, stream);
}

}  // namespace

void backward(const BackwardParams& p, const Layout& layout) {
  // The fused backward as its two steps, one after the other on the stream: every array has
  // the same strides here (core/backend.h), so the one layout walks the masking pass too.
  if (p.activation == Activation::relu || p.dresidual.defined()) {
    const MaskedBackward s = split_masked_backward(p);
    elementwise(s.mask, layout);
    backward(s.plain, layout);
    return;
  }
  DeviceGuard guard(p.x.device.index);
  dispatch_dtype(p.x.dtype, "x", [&](auto d) {
    backward_typed<storage_t<decltype(d)::value>>(p, layout, to_stream(p.exec.stream));
  });
}

void backward_reduce(const BackwardReduceParams& p, const Layout& layout) {
  DeviceGuard guard(p.x.device.index);
  dispatch_dtype(p.x.dtype, "x", [&](auto d) {
    backward_reduce_typed<storage_t<decltype(d)::value>>(p, layout, to_stream(p.exec.stream));
  });
}

void backward_elemt(const BackwardElemtParams& p, const Layout& layout) {
  DeviceGuard guard(p.x.device.index);
  dispatch_dtype(p.x.dtype, "x", [&](auto d) {
    backward_elemt_typed<storage_t<decltype(d)::value>>(p, layout, to_stream(p.exec.stream));
  });
}

}  // namespace batchnorm::cuda
