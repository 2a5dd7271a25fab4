// The elementwise executor on the GPU: out = op(channel's coefficients, a, b) over a Layout of
// (a, [b,] out), for every recipe of core/recipes.h (normalize and its fused variants, dx,
// the ReLU gradient, a copy). Dense channels-first arrays take dense_kernel's flat walk;
// otherwise one channels-first or channels-last kernel template, with 16-byte packs where
// the layout allows. Each thread reads its values before writing them, so out may alias an
// input.
//
// An Op has kInputs (1 or 2), a Coef type, `coef(c)` (channel c's coefficients) and
// `apply(k, a, b)` (b unused when kInputs == 1).
#pragma once
#include "core/layout.h"
#include "cuda/common.cuh"
#include "cuda/convert.cuh"
#include "cuda/dense.cuh"
#include "cuda/walk.cuh"

namespace batchnorm::cuda {

// dense_kernel's per-element interface for an Op (the channel index of each value).
template <class Op>
struct DenseOf {
  static constexpr int kInputs = Op::kInputs;
  Op op;
  template <class A>
  __device__ __forceinline__ A operator()(uint32_t c, A a, A b) const {
    return op.apply(op.coef(c), a, b);
  }
};

template <class T, int W, class Op>
__global__ void __launch_bounds__(kBlock, 2)
    cf_map_kernel(const __grid_constant__ Layout L, const T* a, const T* b, T* out, CfPlan plan, Op op) {
  using A = acc_t<T>;
  constexpr int N = Op::kInputs;
  constexpr int U = kUnroll / N;  // packs in flight, divided among the arrays read
  const CfGeom<N + 1> g(L, W);
  for (int64_t w = blockIdx.x; w < plan.items; w += gridDim.x) {
    const int64_t c = w / plan.splits;
    const int64_t b0 = (w - c * plan.splits) * plan.chunk;
    const int64_t b1 = min(L.count, b0 + plan.chunk);
    const typename Op::Coef k = op.coef(c);
    cf_walk<N + 1, W, U>(L, g, c, b0, b1, [&](const int64_t (&off)[U][N + 1], int n) {
      Pack<T, W> va[U], vb[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u < n) {
          va[u] = *reinterpret_cast<const Pack<T, W>*>(a + off[u][0]);
          if constexpr (N == 2) vb[u] = *reinterpret_cast<const Pack<T, W>*>(b + off[u][1]);
        }
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u < n) {
          Pack<T, W> o;
#pragma unroll
          for (int j = 0; j < W; ++j)
            o.v[j] = store<T>(op.apply(k, load(va[u].v[j]), N == 2 ? load(vb[u].v[j]) : A(0)));
          *reinterpret_cast<Pack<T, W>*>(out + off[u][N]) = o;
        }
    });
  }
}

template <class T, int W, class Op>
__global__ void __launch_bounds__(kBlock, 2)
    cl_map_kernel(const __grid_constant__ Layout L, const T* a, const T* b, T* out, ClPlan plan, Op op) {
  using A = acc_t<T>;
  constexpr int N = Op::kInputs;
  constexpr int U = kUnroll / N;
  const ClGeom<N + 1> g(L);
  const int lane = static_cast<int>(threadIdx.x) % plan.lanes;
  const int row = static_cast<int>(threadIdx.x) / plan.lanes;
  if (row >= plan.rows) return;  // no block-wide synchronization below
  for (int64_t w = blockIdx.x; w < plan.items; w += gridDim.x) {
    const int64_t s = w / plan.tiles;
    const int64_t c = ((w - s * plan.tiles) * plan.lanes + lane) * W;
    if (c >= L.channels) continue;  // W divides C when W > 1
    typename Op::Coef k[W];
#pragma unroll
    for (int j = 0; j < W; ++j) k[j] = op.coef(c + j);
    const int64_t p0 = cl_split_begin(L.count, plan.splits, s);
    const int64_t p1 = cl_split_begin(L.count, plan.splits, s + 1);
    cl_walk<N + 1, U>(L, g, p0, p1, row, plan.rows, [&](const int64_t (&off)[U][N + 1], int n) {
      Pack<T, W> va[U], vb[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u < n) {
          va[u] = *reinterpret_cast<const Pack<T, W>*>(a + off[u][0] + c);
          if constexpr (N == 2) vb[u] = *reinterpret_cast<const Pack<T, W>*>(b + off[u][1] + c);
        }
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (u < n) {
          Pack<T, W> o;
#pragma unroll
          for (int j = 0; j < W; ++j)
            o.v[j] = store<T>(op.apply(k[j], load(va[u].v[j]), N == 2 ? load(vb[u].v[j]) : A(0)));
          *reinterpret_cast<Pack<T, W>*>(out + off[u][N] + c) = o;
        }
    });
  }
}

// Enqueues out = op(a[, b]) over the layout of (a, [b,] out); `b` is ignored for one input.
template <class T, class Op>
void launch_map(const TensorView& a_t, const TensorView& b_t, const TensorView& out_t, const Layout& L, const Op& op,
                cudaStream_t stream) {
  constexpr int N = Op::kInputs;
  const T* a = a_t.ptr<const T>();
  const T* b = N == 2 ? b_t.ptr<const T>() : nullptr;
  T* out = out_t.ptr<T>();
  const void* arrays[] = {a_t.data, N == 2 ? b_t.data : out_t.data, out_t.data};
  if (const DensePlan dense = dense_plan(L, arrays, N + 1, kVecWidth<T>); dense.ok) {
    launch_dense<T>(dense, a, b, out, DenseOf<Op>{op}, stream);
    return;
  }
  if (L.channels_last()) {
    with_width<T>(cl_packable(L, arrays, N + 1, kVecWidth<T>), [&](auto width) {
      constexpr int W = decltype(width)::value;
      const ClPlan plan = cl_plan(L, W);
      cl_map_kernel<T, W, Op><<<grid_for(plan.items), kBlock, 0, stream>>>(L, a, b, out, plan, op);
      BN_CUDA_CHECK_LAUNCH("cl_map_kernel");
    });
  } else {
    with_width<T>(cf_packable(L, arrays, N + 1, kVecWidth<T>), [&](auto width) {
      constexpr int W = decltype(width)::value;
      const CfPlan plan = cf_plan(L, W);
      cf_map_kernel<T, W, Op><<<grid_for(plan.items), kBlock, 0, stream>>>(L, a, b, out, plan, op);
      BN_CUDA_CHECK_LAUNCH("cf_map_kernel");
    });
  }
}

// ---- the recipes' ops ------------------------------------------------------------------

// y = act(normalize(x) [+ residual]) with per-channel (C,) coefficient arrays on the device.
template <class A, bool Residual, Activation Act>
struct ForwardOp {
  static constexpr int kInputs = Residual ? 2 : 1;
  struct Coef {
    A v[3];
  };
  const A* mean;
  const A* scale;
  const A* shift;
  __device__ __forceinline__ Coef coef(int64_t c) const { return Coef{{mean[c], scale[c], shift[c]}}; }
  __device__ __forceinline__ A apply(const Coef& k, A x, A r) const {
    const A in[2] = {x, r};
    return apply_map(ForwardMap<Residual, Act>{}, k.v, in);
  }
};

// dx = backward_dx(dy, x) with per-channel coefficients on the device.
template <class A>
struct GradInputOp {
  static constexpr int kInputs = 2;
  using Coef = BackwardCoefficients<A>;
  const BackwardCoefficients<A>* coef_;
  __device__ __forceinline__ Coef coef(int64_t c) const { return coef_[c]; }
  __device__ __forceinline__ A apply(const Coef& k, A dy, A x) const { return backward_dx<A>(dy, x, k); }
};

// The fused backward's first pass: dy masked by the forward's output, or dy copied.
template <class A, class Map>
struct PlainMapOp {
  static constexpr int kInputs = Map::kIn;
  struct Coef {};
  __device__ __forceinline__ Coef coef(int64_t) const { return Coef{}; }
  __device__ __forceinline__ A apply(const Coef&, A a, A b) const {
    const A in[2] = {a, b};
    return apply_map(Map{}, static_cast<const A*>(nullptr), in);
  }
};

}  // namespace batchnorm::cuda
