// How the kernels walk a Layout. Channels-first: a work item is a contiguous range of one
// channel's values, swept by the block with row/column counters stepped without division.
// Channels-last: a work item is a tile of channels times a range of positions, each thread
// holding a fixed pack of adjacent channels and stepping over positions. Both plans depend on
// the shape (and the pack width) alone, never on the device, so the reduction order is fixed.
#pragma once
#include <cstdint>

#include "core/layout.h"
#include "cuda/common.cuh"

namespace batchnorm::cuda {

// Packs each thread loads before using any (divided among the arrays a kernel reads):
// independent loads in flight hide DRAM latency without relying on occupancy alone.
constexpr int kUnroll = 4;

// ---- Channels-first --------------------------------------------------------------------

// Work items: `splits` ranges of `chunk` values (a multiple of the pack width) per channel;
// item w is split w % splits of channel w / splits.
struct CfPlan {
  int64_t splits = 1;
  int64_t chunk = 1;
  int64_t items = 1;
};

inline CfPlan cf_plan(const Layout& L, int width) {
  const int64_t min_per_item = int64_t(kBlock) * width * min_work();
  CfPlan p;
  const int64_t most = std::max<int64_t>(1, ceil_div(L.count, min_per_item));
  p.splits = std::clamp<int64_t>(ceil_div(target_items(), L.channels), 1, most);
  // (at least one pack: no division by zero below for a count of 0, which the ops never plan)
  p.chunk = std::max<int64_t>(width, ceil_div(ceil_div(L.count, p.splits), width) * width);
  p.splits = ceil_div(L.count, p.chunk);  // no empty ranges
  p.items = L.channels * p.splits;
  return p;
}

// Per-thread constants of the channels-first walk of arrays 0..NT-1 of the layout.
template <int NT>
struct CfGeom {
  int nred;
  int64_t inner;
  int64_t step, step_rows, step_cols;  // the block's stride in values, and as rows + columns
  int64_t cs[NT], os[NT], is[NT];      // channel, outer (nred == 2) and inner strides

  __device__ CfGeom(const Layout& L, int width) {
    nred = L.nred;
    inner = L.inner();
    step = int64_t(kBlock) * width;
    step_rows = step / inner;
    step_cols = step - step_rows * inner;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      cs[t] = L.channel_stride[t];
      os[t] = L.strides[t][0];
      is[t] = L.strides[t][L.nred - 1];
    }
  }
  // Offset of row o (an index over the outer dims) in array t.
  __device__ __forceinline__ int64_t row(const Layout& L, int t, int64_t o) const {
    if (nred == 2) return o * os[t];
    if (nred == 1) return 0;  // a single row
    return L.outer_offset(t, o);
  }
};

// Calls f(off, n) for the values [b0, b1) of channel c that this thread owns: packs of
// `width` values starting at b0 + threadIdx.x * width, then every kBlock * width values, in
// batches of U packs. off[u][t] is the element offset of pack u in array t; packs 0..n-1 of
// a batch are valid.
template <int NT, int width, int U, class F>
__device__ __forceinline__ void cf_walk(const Layout& L, const CfGeom<NT>& g, int64_t c, int64_t b0, int64_t b1,
                                        F&& f) {
  int64_t i = b0 + int64_t(threadIdx.x) * width;
  if (i >= b1) return;
  int64_t o = i / g.inner;
  int64_t r = i - o * g.inner;
  int64_t base[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) base[t] = c * g.cs[t];
  while (i < b1) {
    int64_t off[U][NT] = {};
    int n = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i < b1) {
#pragma unroll
        for (int t = 0; t < NT; ++t) off[u][t] = base[t] + g.row(L, t, o) + r * g.is[t];
        n = u + 1;
      }
      i += g.step;
      o += g.step_rows;
      r += g.step_cols;
      if (r >= g.inner) {  // step_cols < inner, so one carry at most
        r -= g.inner;
        ++o;
      }
    }
    f(off, n);
  }
}

// Packs of `width` values usable for every array: unit inner stride, rows and channels that
// start on pack boundaries, and 16-byte aligned data.
inline bool cf_packable(const Layout& L, const void* const* data, int nt, int width) {
  if (width == 1) return true;
  if (L.inner() % width != 0) return false;
  for (int t = 0; t < nt; ++t) {
    if (reinterpret_cast<uintptr_t>(data[t]) % 16 != 0) return false;
    if (L.strides[t][L.nred - 1] != 1 || L.channel_stride[t] % width != 0) return false;
    for (int d = 0; d + 1 < L.nred; ++d)
      if (L.strides[t][d] % width != 0) return false;
  }
  return true;
}

// ---- Channels-last ---------------------------------------------------------------------

// Work items: `tiles` tiles of lanes * width channels times `splits` ranges of positions;
// item w is tile w % tiles of position range w / tiles. A block is `rows` rows of `lanes`
// threads (threads past rows * lanes idle); a thread's channels are fixed for its item.
struct ClPlan {
  int lanes = 1;
  int rows = 1;
  int64_t tiles = 1;
  int64_t splits = 1;
  int64_t items = 1;
};

inline ClPlan cl_plan(const Layout& L, int width) {
  ClPlan p;
  p.lanes = static_cast<int>(std::min<int64_t>(32, ceil_div(L.channels, width)));
  p.rows = kBlock / p.lanes;
  p.tiles = ceil_div(L.channels, int64_t(p.lanes) * width);
  const int64_t most = std::max<int64_t>(1, ceil_div(L.count, int64_t(p.rows) * min_work_channels_last()));
  p.splits = std::clamp<int64_t>(ceil_div(target_items(), p.tiles), 1, most);
  p.items = p.tiles * p.splits;
  return p;
}

// Positions [begin, end) of split s.
__host__ __device__ inline int64_t cl_split_begin(int64_t count, int64_t splits, int64_t s) {
  return count / splits * s + count % splits * s / splits;
}

template <int NT>
struct ClGeom {
  int nred;
  int64_t ps[NT];  // position stride when the positions form one dim (nred == 1)
  __device__ explicit ClGeom(const Layout& L) {
    nred = L.nred;
#pragma unroll
    for (int t = 0; t < NT; ++t) ps[t] = L.strides[t][0];
  }
  __device__ __forceinline__ int64_t pos(const Layout& L, int t, int64_t p) const {
    return nred == 1 ? p * ps[t] : L.position_offset(t, p);
  }
};

// Calls f(off, n) for the positions p0 + row, p0 + row + rows, ... below p1, in batches of U;
// off[u][t] is the offset of position u of the batch in array t (add the channel for the
// element); positions 0..n-1 of a batch are valid.
template <int NT, int U, class F>
__device__ __forceinline__ void cl_walk(const Layout& L, const ClGeom<NT>& g, int64_t p0, int64_t p1, int row,
                                        int rows, F&& f) {
  for (int64_t p = p0 + row; p < p1; p += int64_t(U) * rows) {
    int64_t off[U][NT] = {};
    int n = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t q = p + int64_t(u) * rows;
      if (q < p1) {
#pragma unroll
        for (int t = 0; t < NT; ++t) off[u][t] = g.pos(L, t, q);
        n = u + 1;
      }
    }
    f(off, n);
  }
}

inline bool cl_packable(const Layout& L, const void* const* data, int nt, int width) {
  if (width == 1) return true;
  if (L.channels % width != 0) return false;
  for (int t = 0; t < nt; ++t) {
    if (reinterpret_cast<uintptr_t>(data[t]) % 16 != 0) return false;
    for (int d = 0; d < L.nred; ++d)
      if (L.strides[t][d] % width != 0) return false;
  }
  return true;
}

// f(std::integral_constant<int, W>{}) with W the 16-byte pack width of T when `packed`, else 1.
template <class T, class F>
void with_width(bool packed, F&& f) {
  if (packed)
    f(std::integral_constant<int, static_cast<int>(16 / sizeof(T))>{});
  else
    f(std::integral_constant<int, 1>{});
}

}  // namespace batchnorm::cuda
