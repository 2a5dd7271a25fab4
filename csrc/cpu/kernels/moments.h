// Statistics primitives. Channels-first: a block of one channel in two passes (its sum,
// then the sums of deviations from the block mean while the block is still in L1).
// Channels-last: Welford over positions, vectorized across channels, in runs merged in
// double with Chan's formula. Neither ever forms E[x^2] - E[x]^2.
#pragma once
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "cpu/kernels/plane_runs.h"
#include "cpu/kernels/short_rows.h"
#include "cpu/kernels/simd.h"
#include "cpu/kernels/walk.h"
#include "cpu/scratch.h"

namespace batchnorm::cpu::BN_ISA {

// Two vector accumulators = lanes<A> lanes; value k of a segment goes to lane k % lanes<A>.
template <class T>
struct Lanes2 {
  using A = acc_t<T>;
  AccFor<T> a, b;
  A total() const { return a.total_with(b); }
};

// Walks a contiguous run of len values in vectors: body(i, lanes_a, n) is called with
// offsets of full (n == vlen) or final partial (n < vlen) vectors, and `lanes_a` telling
// whether they belong to the first or second accumulator of Lanes2 (value k -> lane k % 2V),
// a compile-time constant at every call, so no body picks its accumulator at run time (a
// reference chosen at run time takes the address of both, which keeps them out of registers).
template <class A, class Body>
static inline __attribute__((always_inline)) void walk_vectors(int64_t len, Body&& body) {
  constexpr int V = vlen<A>;
  constexpr std::true_type lanes_a{};
  constexpr std::false_type lanes_b{};
  int64_t i = 0;
  for (; i + 2 * V <= len; i += 2 * V) {
    body(i, lanes_a, V);
    body(i + V, lanes_b, V);
  }
  if (i + V <= len) {
    body(i, lanes_a, V);
    i += V;
    if (i < len) body(i, lanes_b, len - i);
  } else if (i < len) {
    body(i, lanes_a, len - i);
  }
}

// walk_vectors over a tile of `rows` contiguous rows of len values each (for_row_tiles with
// Uniform), reading them side by side as kStreamRows streams the prefetchers follow: vectors
// j and j + 1 of every row, then j + 2 and j + 3, ...; body(off, i, lanes_a, n) for row
// offsets `off`. Vector j of a row goes to the first accumulator when j is even, as in
// walk_vectors; the order of the additions into each depends on the rows' lengths alone.
template <class A, int NT, class Body>
static inline __attribute__((always_inline)) void walk_tile_vectors(const int64_t (*offs)[NT], int64_t len, int rows,
                                                                    Body&& body) {
  constexpr int V = vlen<A>;
  constexpr std::true_type lanes_a{};
  constexpr std::false_type lanes_b{};
  int64_t i = 0;
  if (rows == 1) {  // the same steps, without the loop over rows (a piece's partial rows)
    for (; i + 2 * V <= len; i += 2 * V) {
      body(offs[0], i, lanes_a, V);
      body(offs[0], i + V, lanes_b, V);
    }
  } else {
    for (; i + 2 * V <= len; i += 2 * V)
      for (int r = 0; r < rows; ++r) {
        body(offs[r], i, lanes_a, V);
        body(offs[r], i + V, lanes_b, V);
      }
  }
  if (i + V <= len) {
    for (int r = 0; r < rows; ++r) {
      body(offs[r], i, lanes_a, V);
      if (i + V < len) body(offs[r], i + V, lanes_b, len - i - V);
    }
  } else if (i < len) {
    for (int r = 0; r < rows; ++r) body(offs[r], i, lanes_a, len - i);
  }
}

// Rows ahead that the streamed maps' block walks prefetch (kernels/map.h; a row of a block of 16
// 7x7 channels is 49 lines).
constexpr int64_t kPrefetchRows = 4;

// Prefetches the lines at every 64 bytes of the `bytes` bytes from `elements` elements past p
// (rows ahead, at address_ahead's integer addresses; a range that starts mid-line may leave
// its last line to the hardware).
template <class T>
static inline __attribute__((always_inline)) void prefetch_span(const T* p, int64_t elements, int64_t bytes) {
  const uintptr_t b = address_ahead(p, elements);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(reinterpret_cast<const void*>(b + i));
}
// The same for lines about to be written (__builtin_prefetch for writing: prefetchw where the
// build enables it, -mprfchw, which the ISA flags of csrc/CMakeLists.txt do not: GCC emits
// prefetcht0 there).
template <class T>
static inline __attribute__((always_inline)) void prefetch_span_for_write(const T* p, int64_t elements, int64_t bytes) {
  const uintptr_t b = address_ahead(p, elements);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(reinterpret_cast<const void*>(b + i), 1);
}

// Rows a call of moments_short_rows_channels needs to take runs (PlaneRuns): its two passes'
// gathers and the centers' pattern are fixed costs. AMD EPYC Zen 4, in cache, 1 thread,
// in-process, both orders, runs against ShortRow's rows: 4x2048x7x7 float32 1.19-1.26x the
// time, bfloat16 1.09x; 8 rows 0.99-1.08x; 16 rows 0.92-0.98x (16x256x5x5 0.86x).
constexpr int64_t kStatsRunRows = 16;

// Moments of values [begin, end) of nc (<= MaxC) channels with short rows, channel i at
// x + i * cs, in two passes (the sum, then deviations from the block mean while the block is in
// cache), vector k of every row into accumulator k. Tiles of kStreamRows rows, channel by
// channel within a tile: with adjacent channels (NCHW's small planes, channel stride = the
// row) each of the tile's rows is read in order, as one stream the prefetchers follow, and a
// channel's accumulators stay in registers across the tile. Row by row across the channels,
// each row's 16 planes (3 KB at 7x7 float32, 400 KB from the next in 256x2048x7x7) were too
// short for the prefetchers even with rows fetched ahead: AMD EPYC Zen 4, statistics of
// 256x2048x7x7 float32 took 15.5 -> 8.0 ms on 1 thread, 9.4 -> 4.6 ms on 2; 256x512x5x5
// 1.37 -> 0.80 ms; 32x2048x7x7 (in cache) 1.21 -> 0.84 ms; rows fetched ahead as before made the
// tiles slower (8.0 -> 13 ms). Whole rows (all but a piece's partial ones) go through
// ShortRow's Whole, their shape computed once per call: with each row's length tested vector
// by vector the loops spent more time on it than on the sums. AMD EPYC Zen 4, float32,
// in-process A/B, both orders, huge pages: 256x2048x7x7 from memory 0.89-0.94x the time (1
// and 2 threads; 4 KB pages 0.91-0.93x), training 0.92-0.97x; in cache 64x512x5x5
// 0.82-0.88x, 8x2048x7x7 0.92x; half types 0.95-1.00x; the AVX2 level 0.88-1.00x. Tried and
// left out: the next call's rows prefetched into L2 during the second pass (as moments() does
// for long rows): from memory on huge pages another 0.89x, but on 4 KB pages 1.05-1.09x the
// time and in cache 1.06-1.08x. Each channel's operations and their order do not depend on
// nc, on its neighbours or on the tiling: the same bits.
template <class T, int NV, int MaxC = kBlockChannels>
void moments_short_rows_channels(const T* x, const Layout& L, int64_t cs, int64_t nc, int64_t begin, int64_t end,
                                 Moments<double>* out) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  using R = ShortRow<T, NV>;
  using Runs = PlaneRuns<T, NV>;
  if constexpr (MaxC == 1) nc = 1;  // one channel: loops the compiler can unroll away
  // Planes back to back go as runs of the block's planes (kernels/plane_runs.h), the same bits,
  // from 16 rows a call (kStatsRunRows).
  bool by_runs = false;
  if constexpr (MaxC == kBlockChannels)
    by_runs = begin < end && planes_back_to_back(L, 1) && Runs::pays(L.inner(), nc, end - begin, kStatsRunRows);
  // The channels' sums as ShortRow accumulates them (between tiles; written before read).
  Unset<AccFor<T>[1][MaxC][NV]> sum_of;
  auto& sum = sum_of.v;
  const auto whole = R::whole(L.inner());
  auto sums = [&](const int64_t (*offs)[1], const int64_t* lens, int rows, int64_t i, AccFor<T> (*s)[NV])
                  __attribute__((always_inline)) {
    auto add = [&](int k, V v, V, bool) __attribute__((always_inline)) { s[0][k] += v; };
    R::each_of_tile(x + i * cs, offs, lens, rows, whole, add);
  };
  if constexpr (MaxC == kBlockChannels) {
    if (by_runs) {
      const Runs runs(L.inner(), nc);
      alignas(64) Unset<A[1][Runs::kLanes]> lanes;  // the run's lanes
      runs.template reduce<1, 1>(
          L, begin, end, lanes.v, sum, sums,
          [&](const int64_t (*offs)[1], int rows, int64_t v0, auto g, auto partial, auto& s)
              __attribute__((always_inline)) {
            constexpr int G = decltype(g)::value;
            for (int r = 0; r < rows; ++r)
              for (int q = 0; q < G; ++q) s[0][q] += runs.load(x + offs[r][0] + (v0 + q) * Runs::VL, partial);
          });
    }
  }
  if (!by_runs) short_row_tiles<1, true>(L, begin, end, nc, sum, sums);
  const A n = static_cast<A>(end - begin);
  V vc[MaxC];
  A center[MaxC];
  for (int64_t i = 0; i < nc; ++i) {
    center[i] = R::total(sum[0][i]) / n;
    vc[i] = splat(center[i]);
  }
  Unset<AccFor<T>[2][MaxC][NV]> dsq_of;  // the deviations' sums [0] and their squares' [1]
  auto& dsq = dsq_of.v;
  auto deviations = [&](const int64_t (*offs)[1], const int64_t* lens, int rows, int64_t i, AccFor<T> (*s)[NV])
                        __attribute__((always_inline)) {
    auto add = [&](int k, V v, V mask, bool masked) __attribute__((always_inline)) {
      V d = v - vc[i];
      if (masked) d = mask_lanes<A>(d, mask);
      s[0][k] += d;
      s[1][k] += d * d;
    };
    R::each_of_tile(x + i * cs, offs, lens, rows, whole, add);
  };
  if constexpr (MaxC == kBlockChannels) {
    if (by_runs) {
      const Runs runs(L.inner(), nc);
      alignas(64) Unset<A[Runs::kLanes]> pattern_of;  // the centers, lane by lane
      const A* pattern = pattern_of.v;
      runs.pattern(center, pattern_of.v);
      alignas(64) Unset<A[2][Runs::kLanes]> dsq_lanes;
      runs.template reduce<1, 2>(
          L, begin, end, dsq_lanes.v, dsq, deviations,
          [&](const int64_t (*offs)[1], int rows, int64_t v0, auto g, auto partial, auto& s)
              __attribute__((always_inline)) {
            constexpr int G = decltype(g)::value;
            V c[G];
            Runs::vectors(pattern, v0, c);
            for (int r = 0; r < rows; ++r)
              for (int q = 0; q < G; ++q) {
                const V d = runs.load(x + offs[r][0] + (v0 + q) * Runs::VL, partial) - c[q];
                s[0][q] += d;
                s[1][q] += d * d;
              }
          });
    }
  }
  if (!by_runs) short_row_tiles<1, true>(L, begin, end, nc, dsq, deviations);
  for (int64_t i = 0; i < nc; ++i)
    out[i] = block_moments<double>(static_cast<double>(end - begin), center[i], R::total(dsq[0][i]),
                                   R::total(dsq[1][i]));
}

// Contiguous rows of at least this many bytes: moments()' second pass over a block (kPiece
// values, in L1) prefetches the channel's next block into L2 (LinePrefetcher), a line per 64
// bytes read, the channel's last block as many of the next channel's first values. The first pass
// reads such rows one after the other, or 8 side by side up to 8 KB (kSideBySideRowBytes), and
// the memory idled through the second, which computes on L1. (In the channel-parallel plan's
// blocks of several channels, walked piece by piece across the block, the channel's next block
// is read a few calls later rather than next: measured so, e.g. 8x64x56x56 below.)
// AMD EPYC Zen 4, tools/ab_lib, in-process, 64 MB scrub unless hot, statistics float32 against
// none: 32x64x56x56 0.63-0.69x the time (1 thread), 0.69-0.71x (2), AVX2 level 0.63-0.65x;
// 128x64x56x56 0.72-0.79x; 8x32x112x112 0.74-0.80x; 32x128x40x40 (6.4 KB rows) 0.91x;
// bfloat16 / float16 32x64x56x56 0.72-0.76x; hot in cache 8x64x56x56 0.89x, 4x64x112x112
// 0.86x; training 32x64x56x56 0.79-0.83x, bfloat16 0.84x, 8x32x112x112 0.87-0.93x. Shorter rows
// lost or stayed level (16x16 float32, 1 KB: 1.09-1.18x the time; 20x20 1.01-1.05x; 28x28
// 0.95-1.04x; 32x32, 4 KB, at the bound: 0.99-1.01x): there the side-by-side rows keep the
// prefetchers busy, and a row's prefetch span costs a call. Half types fetch a line per two
// vectors (64 bytes read): a line per vector made them slower in cache (32x64x56x56 training,
// hot, bfloat16 1.14x, 8x64x56x56 float16 1.29-1.41x; now 0.94-1.10x, noise either way of
// level), from memory statistics bfloat16 0.82-0.84x, training float16 0.85-0.88x.
constexpr int64_t kFetchRowBytes = 4096;

template <class T>
Moments<double> moments(const T* x, const Layout& L, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  Moments<double> short_result;
  if (with_short_rows<A>(L, 0, [&](auto nv) {
        moments_short_rows_channels<T, decltype(nv)::value, 1>(x, L, 0, 1, begin, end, &short_result);
      }))
    return short_result;
  const int64_t s = L.inner_stride(0);
  // Strided rows are gathered into the same lanes the contiguous walk uses.
  auto get = [s](const T* p, int64_t i, int64_t n) -> V {
    if (s != 1) return load_strided(p + i * s, s, n);
    return n == vlen<A> ? loadv(p + i) : load_partial(p + i, n);
  };
  // Full contiguous vectors are loaded where they are used (not chosen among the load kinds,
  // which made GCC 12 build converted half-precision vectors whole on the stack under AVX2).
  const bool contiguous = s == 1;
  Lanes2<T> sum;
  if (contiguous && side_by_side<T>(L)) {
    for_row_tiles<1, true>(L, begin, end, [&](const int64_t (*offs)[1], const int64_t* lens, int rows) BN_SEGMENT_BODY {
      walk_tile_vectors<A>(offs, lens[0], rows, [&](const int64_t* off, int64_t i, auto first, int64_t n) BN_SEGMENT_BODY {
        const T* p = x + off[0] + i;
        if (n == vlen<A>) (first ? sum.a : sum.b) += loadv(p);
        else (first ? sum.a : sum.b) += load_partial(p, n);
      });
    });
  } else {
    const int64_t ahead = contiguous ? next_row_prefetch<T>(L, 0) : 0;  // the first pass reads from memory
    for_each_segment<1>(L, begin, end, [&](const int64_t* off, int64_t len) BN_SEGMENT_BODY {
      const T* p = x + off[0];
      walk_vectors<A>(len, [&](int64_t i, auto first, int64_t n) {
        if (ahead) prefetch_at(p + i, ahead);
        if (contiguous && n == vlen<A>) (first ? sum.a : sum.b) += loadv(p + i);
        else (first ? sum.a : sum.b) += get(p, i, n);
      });
    });
  }
  const A n = static_cast<A>(end - begin);
  const A center = sum.total() / n;
  const V vc = splat(center);
  Lanes2<T> dev, sq;
  // The channel's next block (after its last, as many of the next channel's first values) on
  // its way to L2 as this one's second pass computes (see kFetchRowBytes).
  const bool fetch = contiguous && L.inner() * static_cast<int64_t>(sizeof(T)) >= kFetchRowBytes;
  LinePrefetcher<T> next = !fetch          ? LinePrefetcher<T>(x, L, 0, 0)
                           : end < L.count ? LinePrefetcher<T>(x, L, end, std::min(L.count, 2 * end - begin))
                                           : LinePrefetcher<T>(x, L, 0, end - begin, L.channel_stride[0]);
  typename LinePrefetcher<T>::Span span{0, 0};
  static_assert(line_vectors<T> <= 2, "a line is one or two vectors");
  for_each_segment<1>(L, begin, end, [&](const int64_t* off, int64_t len) BN_SEGMENT_BODY {
    const T* p = x + off[0];
    walk_vectors<A>(len, [&](int64_t i, auto first, int64_t n) {
      if (line_vectors<T> == 1 || first) span.step(next);  // a line per line read
      if (contiguous && n == vlen<A>) {
        const V d = loadv(p + i) - vc;
        (first ? dev.a : dev.b) += d;
        (first ? sq.a : sq.b) += d * d;
      } else {
        const V d = mask_lanes<A>(get(p, i, n) - vc, lanes_below<A>(n));
        (first ? dev.a : dev.b) += d;
        (first ? sq.a : sq.b) += d * d;
      }
    });
  });
  return block_moments<double>(static_cast<double>(end - begin), center, dev.total(), sq.total());
}

// moments() of nc channels (channel i at x + i * L.channel_stride[0]), values [begin, end) of
// each, into out[0..nc): short rows in tiles of rows across a block of channels (see
// moments_short_rows_channels), other rows channel by channel. The same bits as moments().
template <class T>
void moments_channels(const T* x, const Layout& L, int64_t nc, int64_t begin, int64_t end, Moments<double>* out) {
  using A = acc_t<T>;
  const int64_t cs = L.channel_stride[0];
  for (int64_t i0 = 0; i0 < nc; i0 += kBlockChannels) {
    const int64_t m = std::min<int64_t>(kBlockChannels, nc - i0);
    if (!with_short_rows<A>(L, 0, [&](auto nv) {
          moments_short_rows_channels<T, decltype(nv)::value>(x + i0 * cs, L, cs, m, begin, end, out + i0);
        }))
      for (int64_t i = 0; i < m; ++i) out[i0 + i] = moments(x + (i0 + i) * cs, L, begin, end);
  }
}

// Calls tile(c0, NV) over [0, Cv) in tiles of NV (4, then 1..3) vectors of channels, NV a
// compile-time constant so each tile's accumulators live in registers.
template <int VL, class Tile>
static inline __attribute__((always_inline)) void for_channel_tiles(int64_t Cv, Tile&& tile) {
  int64_t c0 = 0;
  for (; c0 + 4 * VL <= Cv; c0 += 4 * VL) tile(c0, std::integral_constant<int, 4>{});
  switch ((Cv - c0) / VL) {
    case 3: tile(c0, std::integral_constant<int, 3>{}); break;
    case 2: tile(c0, std::integral_constant<int, 2>{}); break;
    case 1: tile(c0, std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

// x / n for a count n, the same bits as the division: when n is a power of two its reciprocal
// is exact, so x * (1 / n) is the same real number as x / n, rounded once. Full channels-last
// runs of power-of-two channel counts are powers of two (64 positions at 1024 float32
// channels, which is also 4096x1024's group), and their merge divided twice per channel and
// run: a multiply instead made 4096x1024 statistics 4% faster (Xeon, 1 thread, L3-resident:
// 1.00 -> 0.96 ms). A group's last run usually takes the division.
template <class A>
struct DivideBy {
  A n, inv;
  bool exact_inverse;
  explicit DivideBy(int64_t count)
      : n(static_cast<A>(count)), inv(A(1) / static_cast<A>(count)), exact_inverse((count & (count - 1)) == 0) {}
  template <class V>
  inline __attribute__((always_inline)) V operator()(V x, std::true_type) const { return x * inv; }
  template <class V>
  inline __attribute__((always_inline)) V operator()(V x, std::false_type) const { return x / n; }
  // f(std::true_type) when x * inv is exact, else f(std::false_type): loops instantiated per case.
  template <class F>
  inline __attribute__((always_inline)) void dispatch(F&& f) const {
    if (exact_inverse) f(std::true_type{});
    else f(std::false_type{});
  }
};

// total = merge_moments(total, block_moments(n, center[c], dev[c], sq[c])) for every channel
// c, written out over arrays (n > 0 and total_n are the same for every channel).
template <class A>
static inline void merge_run(int64_t C, int64_t count, const A* __restrict center, const A* __restrict dev,
                             const A* __restrict sq, double& total_n, double* __restrict mean,
                             double* __restrict m2) {
  const DivideBy<double> div(count);
  const double n = div.n;
  div.dispatch([&](auto exact) {
    if (total_n == 0) {
      for (int64_t c = 0; c < C; ++c) {
        const double d = dev[c];
        mean[c] = static_cast<double>(center[c]) + div(d, exact);
        const double q = static_cast<double>(sq[c]) - div(d * d, exact);
        m2[c] = q < 0.0 ? 0.0 : q;
      }
    } else {
      const MergeWeights<double> w = merge_weights(total_n, n);
      for (int64_t c = 0; c < C; ++c) {
        const double d = dev[c];
        const double bmean = static_cast<double>(center[c]) + div(d, exact);
        const double q = static_cast<double>(sq[c]) - div(d * d, exact);
        const double bm2 = q < 0.0 ? 0.0 : q;
        const Moments<double> r =
            merge_weighted(Moments<double>{total_n, mean[c], m2[c]}, Moments<double>{n, bmean, bm2}, w);
        mean[c] = r.mean;
        m2[c] = r.m2;
      }
    }
  });
  total_n += n;
}

// Whether successive channels-last positions lie a page or more apart in some array of the
// walk (the row's width: a task that takes a block of a wider row's channels counts the whole
// row): then a tile's lines of successive positions are in different pages, where the
// hardware prefetchers stop.
template <class T>
bool page_rows(const Layout& L) {
  int64_t most = 0;
  for (int t = 0; t < L.ntensors; ++t) most = std::max(most, std::abs(L.strides[t][L.nred - 1]));
  return most * static_cast<int64_t>(sizeof(T)) >= 4096;
}

// Calls tile(c0, nv, i0, i1, resume) so that every channel tile covers positions [0, n) of a
// run in order (`resume`: the tile picks up the sums it parked at the end of the previous
// block of positions). Rows of at most one tile go down the whole run in one call. Wider rows
// go in blocks of positions, every tile of a block before the next block:
//   - Page-wide rows (page_rows) in blocks of kStreamRows positions, so each block reads its
//     rows whole, as kStreamRows streams the prefetchers follow. A tile down the whole run read
//     one 64-256 B piece of each row, rows 4 KB or more apart (the backward's runs are 256
//     positions of dy and x: 512 pages per tile), and waited on DRAM for most of them. Xeon,
//     1 thread, 256x7x7x2048 backward: bfloat16 22-26 -> 15-16 ms, float32 35-37 -> 31-32 ms;
//     at the AVX2 level bfloat16 29-31 -> 17 ms, float32 46 -> 37-38 ms.
//   - Narrower rows a position at a time: memory order, as a copy reads. Several rows share a
//     page there, and blocks of rows read each page's lines out of order (lines 0-3 of each
//     of 8 rows 1 KB apart, then lines 4-7, ...), which the prefetchers followed badly. AMD
//     EPYC Zen 4, data from memory, backward's sums (backward_reduce), against blocks of 8:
//     64x28x28x256 float32 0.44-0.61x the time (2 threads 6.8 -> 4.2 ms, 1 thread 12.6 -> 5.6
//     ms), bfloat16 0.70-0.83x, 8192x512 float32 0.74-0.77x, 64x28x28x128 float32 0.49-0.79x;
//     page-wide rows were mostly slower so (each position parks and resumes its sums):
//     1.12-1.44x on one thread and at 2048 channels, 4096x1024 on 2 threads 0.87-0.99x.
// Each channel sees the same additions in the same order: the same bits.
template <class T, int VL, class Tile>
static inline __attribute__((always_inline)) void for_run_tiles(const Layout& L, int64_t Cv, int64_t n, Tile&& tile) {
  if (Cv > 4 * VL) {
    const int64_t block = page_rows<T>(L) ? kStreamRows : 1;
    for (int64_t i0 = 0; i0 < n; i0 += block) {
      const int64_t i1 = std::min(n, i0 + block);
      for_channel_tiles<VL>(Cv, [&](int64_t c0, auto nv) { tile(c0, nv, i0, i1, i0 > 0); });
    }
  } else {
    for_channel_tiles<VL>(Cv, [&](int64_t c0, auto nv) { tile(c0, nv, int64_t(0), n, false); });
  }
}

// Accumulators parked at p (resume) or fresh zeros.
template <class T, int NV>
static inline __attribute__((always_inline)) void resume_acc(AccFor<T> (&acc)[NV], const acc_t<T>* p, bool resume) {
  if (!resume) return;
  for (int k = 0; k < NV; ++k) acc[k] = AccFor<T>::resume(p + k * vlen<acc_t<T>>);
}
template <class T, int NV>
static inline __attribute__((always_inline)) void park_acc(const AccFor<T> (&acc)[NV], acc_t<T>* p) {
  for (int k = 0; k < NV; ++k) acc[k].park(p + k * vlen<acc_t<T>>);
}

// Whether run_deviations prefetches the next run: under AVX-512, where a vector is one
// register. The second pass reads the run from L2 and the memory idled meanwhile; with the
// next run's lines fetched into L2 as it goes (prefetcht1, a line per 64 bytes of its first
// n_ahead positions), AMD EPYC Zen 4, tools/ab_lib, statistics from memory (64 MB scrub),
// float32: 32x64x56x56 NHWC 0.89x the time (1 thread), 0.94x (2); 256x7x7x2048 0.90x;
// 65536x64 0.84x (1), 0.91x (hot, 2); bfloat16 / float16 32x64x56x56 0.87-0.88x, 256x7x7x2048
// 0.90x; training 256x7x7x2048 and 65536x64 0.95x, 32x64x56x56 0.94x; 64x28x28x256 and
// 4096x1024 level; in cache 16384x256 1.03x, 2048x128 level. Under AVX2 (two registers a
// vector, a 4-vector tile's sums all sixteen) float32 32x64x56x56 took 1.07x the time on one
// thread, 65536x64 1.03x (half types 0.96-0.99x, 256x7x7x2048 0.94x): it does without.
#if defined(__AVX512F__)
constexpr bool kRunPrefetch = true;
#else
constexpr bool kRunPrefetch = false;
#endif

// The second pass of a channels-last run (positions at offs) over a register tile of NV
// vectors of channels, x at the tile's first channel: the sums of the deviations from the
// run's means m and of their squares, into dev and sq; the first n_ahead positions prefetch
// the same channels `ahead` elements on (the next run's; kRunPrefetch). Not inlined: inside
// cl_moments' tile loop GCC 12 kept one of the eight AVX-512 accumulators on the stack, a
// store and a reload per position on the loop's critical path (perf: a third of the time of
// 65536x64 and 4096x1024 statistics at that reload). The same operations in the same order:
// same bits.
template <class T, int NV>
__attribute__((noinline)) void run_deviations(const T* x, const int64_t* offs, int64_t n, const acc_t<T>* m,
                                              acc_t<T>* dev, acc_t<T>* sq, int64_t ahead, int64_t n_ahead) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int VL = vlen<A>;
#if defined(__AVX2__) && !defined(__AVX512F__)
  if constexpr (half_lane_maps<T>()) {  // m, dev and sq in even-odd order (cl_moments)
    f32x8 mh[NV][2], eh[NV][2], qh[NV][2];
    for (int k = 0; k < NV; ++k)
      for (int h = 0; h < 2; ++h) {
        mh[k][h] = load_half_lanes(m + k * VL + 8 * h);
        eh[k][h] = qh[k][h] = f32x8{};
      }
    for (int64_t i = 0; i < n; ++i)
      for (int k = 0; k < NV; ++k) {
        f32x8 v[2];
        load_even_odd(x + offs[i] + k * VL, v[0], v[1]);
        for (int h = 0; h < 2; ++h) {
          const f32x8 d = v[h] - mh[k][h];
          eh[k][h] += d;
          qh[k][h] += d * d;
        }
      }
    for (int k = 0; k < NV; ++k)
      for (int h = 0; h < 2; ++h) {
        std::memcpy(dev + k * VL + 8 * h, &eh[k][h], sizeof(f32x8));
        std::memcpy(sq + k * VL + 8 * h, &qh[k][h], sizeof(f32x8));
      }
    return;
  }
#endif
  V mv[NV];
  for (int k = 0; k < NV; ++k) std::memcpy(&mv[k], m + k * VL, sizeof(V));
  AccFor<T> e[NV], q[NV];
  int64_t i = 0;
  if constexpr (kRunPrefetch)
    for (; i < n_ahead; ++i)
      for (int k = 0; k < NV; ++k) {
        if (k % line_vectors<T> == 0)  // a line per line read
          __builtin_prefetch(reinterpret_cast<const void*>(address_ahead(x + offs[i] + k * VL, ahead)), 0, 2);
        const V d = loadv(x + offs[i] + k * VL) - mv[k];
        e[k] += d;
        q[k] += d * d;
      }
  for (; i < n; ++i)
    for (int k = 0; k < NV; ++k) {
      const V d = loadv(x + offs[i] + k * VL) - mv[k];
      e[k] += d;
      q[k] += d * d;
    }
  for (int k = 0; k < NV; ++k) {
    const V ek = e[k].get(), qk = q[k].get();
    std::memcpy(dev + k * VL, &ek, sizeof(V));
    std::memcpy(sq + k * VL, &qk, sizeof(V));
  }
}

// Channels-last runs of positions are reduced like channels-first blocks: their per-channel
// sums, then the deviations from the run's own mean while the run is still in cache (a run
// holds at most kChannelsLastRunBytes), so neither a mean that dwarfs the spread nor an
// outlier costs digits. Channels go in register tiles across the run's positions.
template <class T>
void cl_moments(const T* x, const Layout& L, int64_t p0, int64_t p1, int64_t run, Moments<double>* out,
                acc_t<T>* scratch) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int VL = vlen<A>;
  const int64_t C = L.channels;
  const int64_t Cv = C / VL * VL;
  A* center = scratch;
  A* dev = scratch + C;
  A* sq = scratch + 2 * C;
  int64_t offs[1][kChannelsLastRun];
  // The running merge of the runs, per channel in double, held as arrays (the run's count is
  // the same for every channel) so the Chan merge below vectorizes across channels: as
  // scalar code per channel and run, its divisions cost more than reading the run (4096x1024
  // statistics: 10.6 ms for 16 MB on one AMD EPYC thread). Same operations, same order, as
  // merge_moments(out, block_moments(...)), so the same bits.
  // Written by the first run's merge (total_n == 0) before any read.
  scratch_array<double> total_mean(static_cast<size_t>(C)), total_m2(static_cast<size_t>(C));
  double total_n = 0;
  // Rows wider than one register tile make their first pass on its own, in blocks of
  // positions (for_run_tiles: page-wide rows as kStreamRows streams, narrower rows in memory
  // order), the sums parked in `center` between blocks; the second pass then finds the run in
  // L2. Page-wide rows, AMD EPYC Zen 4, statistics, against whole-run tiles that fetched the
  // next tile's lines of each row ahead: AVX-512, 1 thread, 4096x1024 2.04 -> 1.44 ms,
  // 2048x2048 1.86 -> 1.38 ms, 256x7x7x2048 11.8 -> 8.0 ms (2 threads 6.6 -> 5.6 ms); AVX2, 1
  // thread, 4096x1024 2.12 -> 1.71 ms. Narrower rows, data from memory, against whole-run
  // tiles (rows of 1 KB had been 6-11% slower in blocks of 8 on one thread): 64x28x28x256
  // float32 0.70-0.75x the time (1 and 2 threads), bfloat16 0.89x, 8192x512 0.90x,
  // 64x28x28x128 0.84x; 128x14x14x256 (26 MB, from the last-level cache) 1.03x.
  const bool first_pass = Cv > 4 * VL;
  for (int64_t r0 = p0; r0 < p1; r0 += run) {
    const int64_t n = std::min(p1, r0 + run) - r0;
    position_offsets(L, r0, n, offs);
    const DivideBy<A> div(n);
    // The next run's positions, a run on (one reduced dim: a progression), fetched as the
    // second pass goes (run_deviations).
    const int64_t ahead = L.nred == 1 ? run * L.strides[0][0] : 0;
    const int64_t n_ahead = kRunPrefetch && L.nred == 1 ? std::clamp<int64_t>(p1 - (r0 + run), 0, n) : 0;
    // Register tiles of channels down the run, the first pass of wide rows on its own (above);
    // a run holds at most 256 KB (or 8 rows), in L2 between the two passes. (Page-wide rows
    // blocked at 030caf0, 4096x1024 and 2048x2048 statistics had been 12-20% slower on the
    // Xeon, L3-resident, 1 thread, and 256x7x7x2048 training no faster: unmeasured there since.)
#if defined(__AVX2__) && !defined(__AVX512F__)
    // half_lane_maps (bfloat16 under AVX2): each 16 channels in load_even_odd's order, the 8
    // even channels then the 8 odd ones, in two registers of 8 lanes (the loads' shifts and
    // shuffles bound these passes); the sums, means and deviations in center, dev and sq so,
    // and the merged moments too (merge_run goes channel by channel), put back in order at
    // the end (put back run by run, they had cost wide rows, whose runs are 8 positions, as
    // much as the passes). Each channel's the same operations in the same order: the same
    // bits.
    if constexpr (half_lane_maps<T>()) {
      // Channels [c0, c0 + NV * VL) of positions [i0, i1) added to s.
      auto add_run = [&](auto& s, int64_t c0, int64_t i0, int64_t i1) __attribute__((always_inline)) {
        constexpr int NV = std::extent_v<std::remove_reference_t<decltype(s)>>;
        for (int64_t i = i0; i < i1; ++i)
          for (int k = 0; k < NV; ++k) {
            f32x8 v[2];
            load_even_odd(x + offs[0][i] + c0 + k * VL, v[0], v[1]);
            s[k][0] += v[0];
            s[k][1] += v[1];
          }
      };
      if (first_pass)
        for_run_tiles<T, VL>(L, Cv, n, [&](int64_t c0, auto nv, int64_t i0, int64_t i1, bool resume) {
          constexpr int NV = decltype(nv)::value;
          f32x8 s[NV][2];  // (assigned, not initialized: `= {}` became a rep stos per tile)
          for (int k = 0; k < NV; ++k)
            for (int h = 0; h < 2; ++h) s[k][h] = resume ? load_half_lanes(center + c0 + k * VL + 8 * h) : f32x8{};
          add_run(s, c0, i0, i1);
          for (int k = 0; k < NV; ++k)  // register by register: a whole-array copy kept s in memory
            for (int h = 0; h < 2; ++h) std::memcpy(center + c0 + k * VL + 8 * h, &s[k][h], sizeof(f32x8));
        });
      for_channel_tiles<VL>(Cv, [&](int64_t c0, auto nv) {
        constexpr int NV = decltype(nv)::value;
        f32x8 s[NV][2];
        for (int k = 0; k < NV; ++k)
          for (int h = 0; h < 2; ++h) s[k][h] = first_pass ? load_half_lanes(center + c0 + k * VL + 8 * h) : f32x8{};
        if (!first_pass) add_run(s, c0, 0, n);
        div.dispatch([&](auto exact) {
          for (int k = 0; k < NV; ++k)
            for (int h = 0; h < 2; ++h) s[k][h] = div(s[k][h], exact);
        });
        for (int k = 0; k < NV; ++k)
          for (int h = 0; h < 2; ++h) std::memcpy(center + c0 + k * VL + 8 * h, &s[k][h], sizeof(f32x8));
        run_deviations<T, NV>(x + c0, offs[0], n, center + c0, dev + c0, sq + c0, ahead, n_ahead);
      });
    } else
#endif
    {
    if (first_pass)
      for_run_tiles<T, VL>(L, Cv, n, [&](int64_t c0, auto nv, int64_t i0, int64_t i1, bool resume) {
        constexpr int NV = decltype(nv)::value;
        AccFor<T> s[NV];
        resume_acc<T, NV>(s, center + c0, resume);
        for (int64_t i = i0; i < i1; ++i)
          for (int k = 0; k < NV; ++k) s[k] += loadv(x + offs[0][i] + c0 + k * VL);
        park_acc<T, NV>(s, center + c0);
      });
    for_channel_tiles<VL>(Cv, [&](int64_t c0, auto nv) {
      constexpr int NV = decltype(nv)::value;
      AccFor<T> s[NV];
      if (first_pass) {
        resume_acc<T, NV>(s, center + c0, true);
      } else {
        for (int64_t i = 0; i < n; ++i)
          for (int k = 0; k < NV; ++k) s[k] += loadv(x + offs[0][i] + c0 + k * VL);
      }
      V m[NV];
      div.dispatch([&](auto exact) {
        for (int k = 0; k < NV; ++k) m[k] = div(s[k].get(), exact);
      });
      for (int k = 0; k < NV; ++k) std::memcpy(center + c0 + k * VL, &m[k], sizeof(V));
      run_deviations<T, NV>(x + c0, offs[0], n, center + c0, dev + c0, sq + c0, ahead, n_ahead);
    });
    }
    // The channels past the last whole vector: one partial vector per position where loads
    // are masked (the same operations lane by lane as the channel-by-channel loop below, so
    // the same bits), else channel by channel, two strided scalar passes each. AMD EPYC Zen 4,
    // tools/ab_lib, in-process, both orders, statistics against channel by channel: in cache, 1
    // thread, 256x24x32x32 NHWC float32 0.33-0.41x the time, 7 channels 0.18x, float16 0.28x,
    // 256x40x16x16 bfloat16 0.34x, AVX2 float32 0.39-0.40x (bfloat16 keeps the loop there);
    // from memory, 2 threads, 256x24x32x32 float32 0.43-0.44x, training 0.47-0.50x.
    int64_t c_tail = Cv;
    if constexpr (masked_loads<T>()) {
      if (Cv < C) {
        const int64_t t = C - Cv;
        AccFor<T> s;
        for (int64_t i = 0; i < n; ++i) s += load_partial(x + offs[0][i] + Cv, t);
        const V m = div(s.get(), std::false_type{});
        store_lanes<A>(center + Cv, m, t);
        AccFor<T> e, q;
        for (int64_t i = 0; i < n; ++i) {
          const V d = load_partial(x + offs[0][i] + Cv, t) - m;
          e += d;
          q += d * d;
        }
        store_lanes<A>(dev + Cv, e.get(), t);
        store_lanes<A>(sq + Cv, q.get(), t);
        c_tail = C;
      }
    }
    for (int64_t c = c_tail; c < C; ++c) {
      A t = A(0);
      for (int64_t i = 0; i < n; ++i) t += load_at(x + offs[0][i] + c);
      center[c] = div(t, std::false_type{});
      A e = A(0), q = A(0);
      for (int64_t i = 0; i < n; ++i) {
        const A d = load_at(x + offs[0][i] + c) - center[c];
        e += d;
        q += d * d;
      }
      dev[c] = e;
      sq[c] = q;
    }
    merge_run(C, n, center, dev, sq, total_n, total_mean.data(), total_m2.data());
  }
  for (int64_t c = 0; c < C; ++c) {
    const int64_t at = half_lane_maps<T>() && c < Cv ? even_odd_at(c) : c;  // channel c's merged moments
    out[c] = total_n == 0 ? Moments<double>{} : Moments<double>{total_n, total_mean[at], total_m2[at]};
  }
}

}  // namespace batchnorm::cpu::BN_ISA
