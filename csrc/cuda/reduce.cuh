// The reduction pieces every reducing kernel shares, all in a fixed order (no atomics), so
// results are bitwise reproducible: per-thread accumulators in the accumulation type (two
// levels: runs of kRun values, then the sum of the runs), the block merges in double, the
// per-item partials and the warp that merges one channel's partials.
#pragma once
#include <cub/block/block_reduce.cuh>

#include <cstdint>

#include "core/recipes.h"
#include "cuda/common.cuh"

namespace batchnorm::cuda {

// Values per channel summed into a run before the run is added to the thread's total: two
// levels keep the rounding of a float sum near sqrt(kRun) + sqrt(runs) ulps rather than
// growing with the whole length of a thread's range.
constexpr int kRun = 256;

// Per-thread moments of W channels: sums of v - shift and (v - shift)^2, shift being the
// thread's first value of the channel. block_moments turns them into (n, mean, M2) with the
// first-order correction, so neither the magnitude of the mean nor a float running mean
// costs accuracy (no E[x^2] - E[x]^2, and no per-value division as in Welford).
template <class A, int W>
struct ShiftedSums {
  A shift[W], s1[W], s2[W];  // the current run
  A d1[W], d2[W];             // the finished runs
  int64_t n = 0;
  int run = 0;

  __device__ ShiftedSums() {
#pragma unroll
    for (int j = 0; j < W; ++j) shift[j] = s1[j] = s2[j] = d1[j] = d2[j] = A(0);
  }
  __device__ __forceinline__ void add(int j, A v) {
    const A d = v - shift[j];
    s1[j] += d;
    s2[j] += d * d;
  }
  // `values` more values of each channel were added.
  __device__ __forceinline__ void counted(int values) {
    n += values;
    run += values;
    if (run >= kRun) flush();
  }
  __device__ __forceinline__ void flush() {
#pragma unroll
    for (int j = 0; j < W; ++j) {
      d1[j] += s1[j];
      d2[j] += s2[j];
      s1[j] = s2[j] = A(0);
    }
    run = 0;
  }
  // Channel j's moments, formed in double; call after flush().
  __device__ __forceinline__ Moments<double> moments(int j) const {
    return block_moments<double>(static_cast<double>(n), static_cast<double>(shift[j]), static_cast<double>(d1[j]),
                                 static_cast<double>(d2[j]));
  }
};

// The two sums of the backward pass of one channel.
struct GradPartial {
  double dy = 0.0;     // sum(dy)
  double dy_xmu = 0.0;  // sum(dy * (x - mean))
};

// Per-thread backward sums of W channels, in two levels like ShiftedSums.
template <class A, int W>
struct GradSums {
  A s1[W], s2[W];  // the current run
  A d1[W], d2[W];  // the finished runs
  int run = 0;

  __device__ GradSums() {
#pragma unroll
    for (int j = 0; j < W; ++j) s1[j] = s2[j] = d1[j] = d2[j] = A(0);
  }
  __device__ __forceinline__ void add(int j, A dy, A x, A mean) {
    s1[j] += dy;
    s2[j] += grad_term(dy, x, mean);
  }
  __device__ __forceinline__ void counted(int values) {
    run += values;
    if (run >= kRun) flush();
  }
  __device__ __forceinline__ void flush() {
#pragma unroll
    for (int j = 0; j < W; ++j) {
      d1[j] += s1[j];
      d2[j] += s2[j];
      s1[j] = s2[j] = A(0);
    }
    run = 0;
  }
  __device__ __forceinline__ GradPartial partial(int j) const {
    return GradPartial{static_cast<double>(d1[j]), static_cast<double>(d2[j])};
  }
};

struct MergeMomentsOp {
  __device__ __forceinline__ Moments<double> operator()(const Moments<double>& a, const Moments<double>& b) const {
    return merge_moments(a, b);
  }
};

struct AddGradOp {
  __device__ __forceinline__ GradPartial operator()(const GradPartial& a, const GradPartial& b) const {
    return GradPartial{a.dy + b.dy, a.dy_xmu + b.dy_xmu};
  }
};

__device__ __forceinline__ Moments<double> shfl_down(const Moments<double>& m, int delta) {
  Moments<double> r;
  r.n = __shfl_down_sync(0xffffffffu, m.n, delta);
  r.mean = __shfl_down_sync(0xffffffffu, m.mean, delta);
  r.m2 = __shfl_down_sync(0xffffffffu, m.m2, delta);
  return r;
}

__device__ __forceinline__ GradPartial shfl_down(const GradPartial& g, int delta) {
  return GradPartial{__shfl_down_sync(0xffffffffu, g.dy, delta), __shfl_down_sync(0xffffffffu, g.dy_xmu, delta)};
}

// Where the per-item partials of a reduction are: channel c's split s is at
// data[c * channel_stride + s * split_stride].
template <class R>
struct Partials {
  R* data = nullptr;
  int64_t splits = 1;
  int64_t channel_stride = 1;
  int64_t split_stride = 1;
};

// The merge of channel c's partials by one whole warp (c must be the same in every lane):
// lane l takes splits l, l + 32, ... in order, then a fixed shuffle tree. Valid in lane 0.
template <class R, class Op>
__device__ __forceinline__ R warp_merge(const Partials<R>& part, int64_t c, Op op) {
  const int lane = static_cast<int>(threadIdx.x & 31u);
  R acc{};
  const R* p = part.data + c * part.channel_stride;
  for (int64_t s = lane; s < part.splits; s += 32) acc = op(acc, p[s * part.split_stride]);
#pragma unroll
  for (int delta = 16; delta > 0; delta >>= 1) acc = op(acc, shfl_down(acc, delta));
  return acc;
}

// Channels-last block merge: the `rows` threads that share a lane (lane + row * lanes) are
// merged by a fixed tree through shared memory `sm` (kBlock entries). Every thread of the
// block must call it; the result is valid in row 0. `active` threads take part.
template <class R, class Op>
__device__ __forceinline__ R merge_rows(R* sm, const R& value, bool active, int row, int lanes, int rows, Op op) {
  const int tid = static_cast<int>(threadIdx.x);
  sm[tid] = value;
  __syncthreads();
  int half = 1;
  while (half < rows) half <<= 1;
  for (half >>= 1; half > 0; half >>= 1) {
    if (active && row < half && row + half < rows) sm[tid] = op(sm[tid], sm[tid + half * lanes]);
    __syncthreads();
  }
  const R r = sm[tid];
  __syncthreads();  // the caller's next round overwrites sm
  return r;
}

// Whole-block merge for channels-first items (all threads on one channel): CUB's fixed tree.
template <class R, class Op>
struct BlockMerge {
  using Reduce = cub::BlockReduce<R, kBlock>;
  using TempStorage = typename Reduce::TempStorage;
  // Valid in thread 0; the caller syncs before reusing `tmp`.
  __device__ __forceinline__ static R run(TempStorage& tmp, const R& value) { return Reduce(tmp).Reduce(value, Op{}); }
};

// Warps of `kBlock` threads each merging one channel's partials, for `channels` channels.
inline unsigned warp_grid(int64_t channels) { return grid_for(ceil_div(channels, kBlock / 32)); }

// The channel of the calling warp in a warp-per-channel kernel, striding by the grid.
__device__ __forceinline__ int64_t first_warp_channel() {
  return int64_t(blockIdx.x) * (kBlock / 32) + (threadIdx.x >> 5);
}
__device__ __forceinline__ int64_t warp_channel_stride() { return int64_t(gridDim.x) * (kBlock / 32); }

}  // namespace batchnorm::cuda
