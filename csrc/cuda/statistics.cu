// CUDA statistics: per-channel moments in two launches. The reduction splits every channel
// into fixed work items (about kTargetBlocks of them, whatever the channel count), each
// block leaving one Moments<double> partial; the finalize merges a channel's partials with
// one warp in a fixed order and writes what the op asked for (see moments.cuh).
#include "core/backend.h"
#include "cuda/common.cuh"
#include "cuda/convert.cuh"
#include "cuda/moments.cuh"
#include "cuda/reduce.cuh"
#include "cuda/walk.cuh"

namespace batchnorm::cuda {

namespace {

template <class T, int W>
__global__ void __launch_bounds__(kBlock, 2)
    cf_moments_kernel(const __grid_constant__ Layout L, const T* __restrict__ x, CfPlan plan,
                      Moments<double>* __restrict__ part) {
  using A = acc_t<T>;
  constexpr int U = kUnroll;  // one array read
  using Merge = BlockMerge<Moments<double>, MergeMomentsOp>;
  __shared__ typename Merge::TempStorage tmp;
  const CfGeom<1> g(L, W);
  for (int64_t w = blockIdx.x; w < plan.items; w += gridDim.x) {
    const int64_t c = w / plan.splits;
    const int64_t b0 = (w - c * plan.splits) * plan.chunk;
    const int64_t b1 = min(L.count, b0 + plan.chunk);
    ShiftedSums<A, 1> acc;
    cf_walk<1, W, U>(L, g, c, b0, b1, [&](const int64_t (&off)[U][1], int n) {
      Pack<T, W> v[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u < n) v[u] = *reinterpret_cast<const Pack<T, W>*>(x + off[u][0]);
      if (acc.n == 0) acc.shift[0] = load(v[0].v[0]);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u < n) {
#pragma unroll
          for (int j = 0; j < W; ++j) acc.add(0, load(v[u].v[j]));
        }
      acc.counted(n * W);
    });
    acc.flush();
    const Moments<double> m = Merge::run(tmp, acc.moments(0));
    if (threadIdx.x == 0) part[w] = m;  // part[c * splits + s]
    __syncthreads();
  }
}

template <class T, int W>
__global__ void __launch_bounds__(kBlock, 2)
    cl_moments_kernel(const __grid_constant__ Layout L, const T* __restrict__ x, ClPlan plan,
                      Moments<double>* __restrict__ part) {
  using A = acc_t<T>;
  constexpr int U = kUnroll;  // one array read
  __shared__ Moments<double> sm[kBlock];
  const ClGeom<1> g(L);
  const int lane = static_cast<int>(threadIdx.x) % plan.lanes;
  const int row = static_cast<int>(threadIdx.x) / plan.lanes;
  for (int64_t w = blockIdx.x; w < plan.items; w += gridDim.x) {
    const int64_t s = w / plan.tiles;
    const int64_t c = ((w - s * plan.tiles) * plan.lanes + lane) * W;
    const bool active = row < plan.rows && c < L.channels;  // W divides C when W > 1
    const int64_t p0 = cl_split_begin(L.count, plan.splits, s);
    const int64_t p1 = cl_split_begin(L.count, plan.splits, s + 1);
    ShiftedSums<A, W> acc;
    if (active) {
      cl_walk<1, U>(L, g, p0, p1, row, plan.rows, [&](const int64_t (&off)[U][1], int n) {
        Pack<T, W> v[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (u < n) v[u] = *reinterpret_cast<const Pack<T, W>*>(x + off[u][0] + c);
        if (acc.n == 0) {
#pragma unroll
          for (int j = 0; j < W; ++j) acc.shift[j] = load(v[0].v[j]);
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (u < n) {
#pragma unroll
            for (int j = 0; j < W; ++j) acc.add(j, load(v[u].v[j]));
          }
        acc.counted(n);
      });
    }
    acc.flush();
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const Moments<double> m =
          merge_rows(sm, active ? acc.moments(j) : Moments<double>{}, active, row, plan.lanes, plan.rows, MergeMomentsOp{});
      if (active && row == 0) part[s * L.channels + c + j] = m;  // part[s * C + c]
    }
  }
}

// Channel c's outputs of `out` from its batch mean and biased variance over `count` values
// (the finalize of a reduction, or statistics given by the caller).
template <class A>
__device__ __forceinline__ void finish_channel(int64_t c, double batch_mean, double var, int64_t count,
                                               const MomentsOutputs& out) {
  const A mean = static_cast<A>(batch_mean);
  if (out.wide) {
    if (out.mean) static_cast<double*>(out.mean)[c] = batch_mean;
    if (out.var) static_cast<double*>(out.var)[c] = var;
  } else {
    if (out.mean) static_cast<A*>(out.mean)[c] = mean;
    if (out.var) static_cast<A*>(out.var)[c] = static_cast<A>(var);
  }
  // The running statistics as they were before this step (batch renorm reads them).
  double rm = 0.0, rv = 0.0;
  if (out.running_mean.data) {
    rm = load_param(out.running_mean, c, 0.0);
    rv = load_param(out.running_var, c, 0.0);
  }
  if (out.mean64) {
    out.mean64[c] = batch_mean;
    out.var64[c] = var;
  }
  if (out.invstd) {
    const A weight = static_cast<A>(load_param(out.weight, c, 1.0)), bias = static_cast<A>(load_param(out.bias, c, 0.0));
    ForwardCoefficients<A> k = forward_coefficients<A>(batch_mean, var, out.eps, weight, bias);
    if (forward_coefficients_overflowed(k)) widen_forward_coefficients(k, var, out.eps, weight);
    if (out.renorm_r) {
      const Renorm<A> rd = renorm_correction<A>(batch_mean, var, rm, rv, out.eps, out.rmax, out.dmax);
      renormalize(k, rd, weight, bias);
      static_cast<A*>(out.renorm_r)[c] = rd.r;
      static_cast<A*>(out.renorm_d)[c] = rd.d;
    }
    static_cast<A*>(out.invstd)[c] = k.invstd;
    static_cast<A*>(out.scale)[c] = k.scale;
    static_cast<A*>(out.shift)[c] = k.shift;
  }
  if (out.running_mean.data) {
    update_running<A>(rm, rv, mean, var, static_cast<double>(count), out.momentum, out.running);
    store_param(out.running_mean, c, rm);
    store_param(out.running_var, c, rv);
  }
}

// One warp per channel: merges the partials, then writes the outputs of `out`.
template <class A>
__global__ void __launch_bounds__(kBlock)
    finalize_moments_kernel(Partials<Moments<double>> part, int64_t channels, int64_t count, MomentsOutputs out) {
  for (int64_t c = first_warp_channel(); c < channels; c += warp_channel_stride()) {
    const Moments<double> m = warp_merge(part, c, MergeMomentsOp{});
    if ((threadIdx.x & 31u) != 0) continue;
    finish_channel<A>(c, m.mean, biased_variance(m), count, out);
  }
}

template <class A>
__global__ void __launch_bounds__(kBlock)
    given_moments_kernel(ParamRef mean, ParamRef var, int64_t channels, int64_t count, MomentsOutputs out) {
  for (int64_t c = int64_t(blockIdx.x) * kBlock + threadIdx.x; c < channels; c += int64_t(gridDim.x) * kBlock)
    finish_channel<A>(c, load_param(mean, c, 0.0), load_param(var, c, 0.0), count, out);
}

template <class T>
void reduce_moments_typed(const TensorView& x, const Layout& L, const MomentsOutputs& out, cudaStream_t stream,
                          const ScratchAllocator* scratch) {
  using A = acc_t<T>;
  const T* data = x.ptr<const T>();
  const void* arrays[] = {x.data};
  Workspace ws(x.device.index, stream, scratch);
  Partials<Moments<double>> part;
  if (L.channels_last()) {
    with_width<T>(cl_packable(L, arrays, 1, kVecWidth<T>), [&](auto width) {
      constexpr int W = decltype(width)::value;
      const ClPlan plan = cl_plan(L, W);
      part = {ws.alloc<Moments<double>>(plan.splits * L.channels), plan.splits, 1, L.channels};
      cl_moments_kernel<T, W><<<grid_for(plan.items), kBlock, 0, stream>>>(L, data, plan, part.data);
      BN_CUDA_CHECK_LAUNCH("cl_moments_kernel");
    });
  } else {
    with_width<T>(cf_packable(L, arrays, 1, kVecWidth<T>), [&](auto width) {
      constexpr int W = decltype(width)::value;
      const CfPlan plan = cf_plan(L, W);
      part = {ws.alloc<Moments<double>>(plan.items), plan.splits, plan.splits, 1};
      cf_moments_kernel<T, W><<<grid_for(plan.items), kBlock, 0, stream>>>(L, data, plan, part.data);
      BN_CUDA_CHECK_LAUNCH("cf_moments_kernel");
    });
  }
  finalize_moments_kernel<A><<<warp_grid(L.channels), kBlock, 0, stream>>>(part, L.channels, L.count, out);
  BN_CUDA_CHECK_LAUNCH("finalize_moments_kernel");
}

}  // namespace

void reduce_moments(const TensorView& x, const Layout& layout, const MomentsOutputs& out, cudaStream_t stream,
                    const ScratchAllocator* scratch) {
  dispatch_dtype(x.dtype, "x", [&](auto d) {
    reduce_moments_typed<storage_t<decltype(d)::value>>(x, layout, out, stream, scratch);
  });
}

void given_moments(DType x_dtype, const ParamRef& mean, const ParamRef& var, int64_t channels, int64_t count,
                   const MomentsOutputs& out, cudaStream_t stream) {
  dispatch_dtype(x_dtype, "x", [&](auto d) {
    using A = acc_t<storage_t<decltype(d)::value>>;
    given_moments_kernel<A><<<grid_for(ceil_div(channels, kBlock)), kBlock, 0, stream>>>(mean, var, channels, count,
                                                                                       out);
    BN_CUDA_CHECK_LAUNCH("given_moments_kernel");
  });
}

void statistics(const StatisticsParams& p, const Layout& layout) {
  DeviceGuard guard(p.x.device.index);
  MomentsOutputs out;
  out.mean = p.mean.data;
  out.var = p.var.data;
  out.wide = p.mean.dtype == DType::float64;
  reduce_moments(p.x, layout, out, to_stream(p.exec.stream), p.exec.scratch);
}

}  // namespace batchnorm::cuda
