// CUDA backward: one split reduction of (sum dy, sum dy * (x - mean)) per channel with the
// same work items and fixed merge order as the statistics, a warp-per-channel finalize that
// writes dweight, dbias and the coefficients of math.h's backward_dx, then the elementwise dx.
// dx may be dy or x itself (each thread reads its values before writing them).
#include "core/backend.h"
#include "cuda/common.cuh"
#include "cuda/convert.cuh"
#include "cuda/dense.cuh"
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
          for (int j = 0; j < W; ++j) acc.add(0, load(gv[u].v[j]), load(xv[u].v[j]) - mean);
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
            for (int j = 0; j < W; ++j) acc.add(j, load(gv[u].v[j]), load(xv[u].v[j]) - mean[j]);
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

// One warp per channel: the sums, dweight = sum(dy * (x - mean)) * invstd, dbias = sum(dy),
// and the coefficients of backward_dx, exactly as the CPU computes them.
template <class A>
__global__ void __launch_bounds__(kBlock)
    grad_finalize_kernel(Partials<GradPartial> part, int64_t channels, int64_t count, ParamRef saved_mean,
                         ParamRef saved_invstd, ParamRef weight, A* __restrict__ dweight, A* __restrict__ dbias,
                         BackwardCoefficients<A>* __restrict__ coef) {
  for (int64_t c = first_warp_channel(); c < channels; c += warp_channel_stride()) {
    const GradPartial sums = warp_merge(part, c, AddGradOp{});
    if ((threadIdx.x & 31u) != 0) continue;
    const A mean = static_cast<A>(load_param(saved_mean, c, 0.0));
    const A invstd = static_cast<A>(load_param(saved_invstd, c, 1.0));
    const A w = static_cast<A>(load_param(weight, c, 1.0));
    dbias[c] = static_cast<A>(sums.dy);
    dweight[c] = static_cast<A>(sums.dy_xmu * static_cast<double>(invstd));
    coef[c] = backward_coefficients<A>(static_cast<A>(sums.dy), static_cast<A>(sums.dy_xmu), static_cast<A>(count),
                                       mean, invstd, w);
  }
}

template <class T, int W>
__global__ void __launch_bounds__(kBlock, 2)
    cf_grad_input_kernel(const __grid_constant__ Layout L, const T* dy, const T* x, T* dx, CfPlan plan,
                         const BackwardCoefficients<acc_t<T>>* __restrict__ coef) {
  using A = acc_t<T>;
  constexpr int U = kUnroll / 2;  // two arrays read
  const CfGeom<3> g(L, W);
  for (int64_t w = blockIdx.x; w < plan.items; w += gridDim.x) {
    const int64_t c = w / plan.splits;
    const int64_t b0 = (w - c * plan.splits) * plan.chunk;
    const int64_t b1 = min(L.count, b0 + plan.chunk);
    const BackwardCoefficients<A> k = coef[c];
    cf_walk<3, W, U>(L, g, c, b0, b1, [&](const int64_t (&off)[U][3], int n) {
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
          Pack<T, W> o;
#pragma unroll
          for (int j = 0; j < W; ++j) o.v[j] = store<T>(backward_dx<A>(load(gv[u].v[j]), load(xv[u].v[j]), k));
          *reinterpret_cast<Pack<T, W>*>(dx + off[u][2]) = o;
        }
    });
  }
}

template <class T, int W>
__global__ void __launch_bounds__(kBlock, 2)
    cl_grad_input_kernel(const __grid_constant__ Layout L, const T* dy, const T* x, T* dx, ClPlan plan,
                         const BackwardCoefficients<acc_t<T>>* __restrict__ coef) {
  using A = acc_t<T>;
  constexpr int U = kUnroll / 2;  // two arrays read
  const ClGeom<3> g(L);
  const int lane = static_cast<int>(threadIdx.x) % plan.lanes;
  const int row = static_cast<int>(threadIdx.x) / plan.lanes;
  if (row >= plan.rows) return;  // no block-wide synchronization below
  for (int64_t w = blockIdx.x; w < plan.items; w += gridDim.x) {
    const int64_t s = w / plan.tiles;
    const int64_t c = ((w - s * plan.tiles) * plan.lanes + lane) * W;
    if (c >= L.channels) continue;  // W divides C when W > 1
    BackwardCoefficients<A> k[W];
#pragma unroll
    for (int j = 0; j < W; ++j) k[j] = coef[c + j];
    const int64_t p0 = cl_split_begin(L.count, plan.splits, s);
    const int64_t p1 = cl_split_begin(L.count, plan.splits, s + 1);
    cl_walk<3, U>(L, g, p0, p1, row, plan.rows, [&](const int64_t (&off)[U][3], int n) {
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
          Pack<T, W> o;
#pragma unroll
          for (int j = 0; j < W; ++j) o.v[j] = store<T>(backward_dx<A>(load(gv[u].v[j]), load(xv[u].v[j]), k[j]));
          *reinterpret_cast<Pack<T, W>*>(dx + off[u][2] + c) = o;
        }
    });
  }
}

// backward_dx() with channel c's coefficients, for dense_kernel (inputs dy, x).
template <class A>
struct GradInputOp {
  static constexpr int kInputs = 2;
  const BackwardCoefficients<A>* coef;
  __device__ __forceinline__ A operator()(uint32_t c, A dy, A x) const { return backward_dx<A>(dy, x, coef[c]); }
};

template <class T>
void backward_typed(const BackwardParams& p, const Layout& L, cudaStream_t stream) {
  using A = acc_t<T>;
  const T* dy = p.dy.ptr<const T>();
  const T* x = p.x.ptr<const T>();
  T* dx = p.dx.ptr<T>();
  const void* inputs[] = {p.dy.data, p.x.data};
  const void* arrays[] = {p.dy.data, p.x.data, p.dx.data};
  const ParamRef saved_mean = param_ref(p.saved_mean);
  Workspace ws(p.x.device.index, stream, p.exec.scratch);
  auto* coef = ws.alloc<BackwardCoefficients<A>>(L.channels);
  Partials<GradPartial> part;
  const bool cl = L.channels_last();
  if (cl) {
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
  grad_finalize_kernel<A><<<warp_grid(L.channels), kBlock, 0, stream>>>(
      part, L.channels, L.count, saved_mean, param_ref(p.saved_invstd), param_ref(p.weight), p.dweight.ptr<A>(),
      p.dbias.ptr<A>(), coef);
  BN_CUDA_CHECK_LAUNCH("grad_finalize_kernel");
  if (const DensePlan dense = dense_plan(L, arrays, 3, kVecWidth<T>); dense.ok) {
    launch_dense<T>(dense, dy, x, dx, GradInputOp<A>{coef}, stream);
    return;
  }
  if (cl) {
    with_width<T>(cl_packable(L, arrays, 3, kVecWidth<T>), [&](auto width) {
      constexpr int W = decltype(width)::value;
      const ClPlan plan = cl_plan(L, W);
      cl_grad_input_kernel<T, W><<<grid_for(plan.items), kBlock, 0, stream>>>(L, dy, x, dx, plan, coef);
      BN_CUDA_CHECK_LAUNCH("cl_grad_input_kernel");
    });
  } else {
    with_width<T>(cf_packable(L, arrays, 3, kVecWidth<T>), [&](auto width) {
      constexpr int W = decltype(width)::value;
      const CfPlan plan = cf_plan(L, W);
      cf_grad_input_kernel<T, W><<<grid_for(plan.items), kBlock, 0, stream>>>(L, dy, x, dx, plan, coef);
      BN_CUDA_CHECK_LAUNCH("cf_grad_input_kernel");
    });
  }
}

}  // namespace

void backward(const BackwardParams& p, const Layout& layout) {
  DeviceGuard guard(p.x.device.index);
  dispatch_dtype(p.x.dtype, "x", [&](auto d) {
    backward_typed<storage_t<decltype(d)::value>>(p, layout, to_stream(p.exec.stream));
  });
}

}  // namespace batchnorm::cuda
