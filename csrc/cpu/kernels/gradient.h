// Backward's reduction primitives: the one fused reduction (sum dy, sum dy * (x - mean)),
// the terms from core/recipes.h. (dx, the elementwise half, is a recipe of kernels/map.h.)
#pragma once
#include "cpu/kernels/moments.h"

namespace batchnorm::cpu::BN_ISA {

// grad_term as a callable for Acc::add_of, on whole vectors or their parts.
constexpr auto grad_term_of = [](auto dy, auto x, auto mean) { return grad_term(dy, x, mean); };

// Rows a call of grad_sums_short_rows_channels needs to take runs (PlaneRuns; one pass, one
// gather of two sums). AMD EPYC Zen 4, in cache, 1 thread, in-process, both orders, runs
// against ShortRow's rows: 4x2048x7x7 float32 0.99x the time, bfloat16 1.03-1.08x; 8 rows
// 0.88-0.90x (float32 and bfloat16).
constexpr int64_t kGradRunRows = 8;

// grad_sums over short contiguous rows of dy and x (see ShortRow) of nc (<= MaxC) channels
// (channel i at dy + i * cd, x + i * cx, its mean at mean[i]): vector k of every row into
// accumulator k, the tail vector's repeated lanes masked out of both sums. In tiles of rows,
// channel by channel within a tile, as moments_short_rows_channels walks (kStreamRows streams
// of each array): AMD EPYC Zen 4, float32 backward, 2 threads, 256x2048x7x7 18.6 -> 13.3 ms
// (rows fetched ahead as before: 15.4), 256x512x5x5 1.26 -> 1.09 ms; each channel's operations
// and their order do not depend on nc, its neighbours or the tiling: the same bits.
template <class T, int NV, int MaxC = kBlockChannels>
void grad_sums_short_rows_channels(const T* dy, const T* x, const Layout& L, int64_t cd, int64_t cx, int64_t nc,
                                   int64_t begin, int64_t end, const acc_t<T>* mean, double* sum_dy,
                                   double* sum_dy_xmu) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int VL = vlen<A>;
  using R = ShortRow<T, NV>;
  using Runs = PlaneRuns<T, NV>;
  if constexpr (MaxC == 1) nc = 1;  // one channel: loops the compiler can unroll away
  V vm[MaxC];
  for (int64_t i = 0; i < nc; ++i) vm[i] = splat(mean[i]);
  // The channels' sums between tiles, written by the first tile (see Unset): AMD EPYC Zen 4,
  // 1 thread, in cache, backward 8x512x7x7 float32 0.95x the time, 4x256x5x5 0.95-0.97x,
  // 8x2048x7x7 0.93-1.00x; from memory level. (ShortRow's Whole, as the statistics take whole
  // rows, made float32 backward 1.04-1.10x slower here, in cache and from memory, bfloat16
  // 0.94-0.95x: not taken.)
  Unset<AccFor<T>[2][MaxC][NV]> sums_of;  // sum dy [0] and sum dy * (x - mean) [1]
  auto& sums = sums_of.v;
  // One row of channel i into the tile's accumulators b1, b2.
  auto row = [&](const T* dp, const T* xp, int64_t len, V m, AccFor<T>* b1, AccFor<T>* b2)
                 __attribute__((always_inline)) {
    if (len < VL) {
      const V lanes = lanes_below<A>(len);
      const V g = load_partial(dp, len);
      b1[0] += g;
      b2[0] += mask_lanes<A>(grad_term(g, load_partial(xp, len), m), lanes);
      return;
    }
    const int64_t full = len / VL, tail = len - full * VL;
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) {
      if (k < full) {
        const V g = loadv(dp + k * VL);
        b1[k] += g;
        b2[k].add_of(grad_term_of, g, loadv(xp + k * VL), m);
      } else if (k == full && tail != 0) {
        const V lanes = lanes_from<A>(VL - tail);
        const V g = mask_lanes<A>(loadv(dp + len - VL), lanes);
        b1[k] += g;
        b2[k] += mask_lanes<A>(grad_term(g, loadv(xp + len - VL), m), lanes);
      }
    }
  };
  auto rows_of = [&](const int64_t (*offs)[2], const int64_t* lens, int rows, int64_t i, AccFor<T> (*b)[NV])
                     __attribute__((always_inline)) {
    for (int r = 0; r < rows; ++r) row(dy + i * cd + offs[r][0], x + i * cx + offs[r][1], lens[r], vm[i], b[0], b[1]);
  };
  // Planes back to back go as runs of the block's planes (kernels/plane_runs.h), the same bits,
  // from 8 rows a call (kGradRunRows).
  bool by_runs = false;
  if constexpr (MaxC == kBlockChannels) {
    by_runs = begin < end && planes_back_to_back(L, 2) && Runs::pays(L.inner(), nc, end - begin, kGradRunRows);
    if (by_runs) {
      const Runs runs(L.inner(), nc);
      alignas(64) Unset<A[2][Runs::kLanes]> lanes_of;
      alignas(64) Unset<A[Runs::kLanes]> pattern_of;  // the means, lane by lane
      runs.pattern(mean, pattern_of.v);
      runs.template reduce<2, 2>(
          L, begin, end, lanes_of.v, sums, rows_of,
          [&](const int64_t (*offs)[2], int rows, int64_t v0, auto g, auto partial, auto& s)
              __attribute__((always_inline)) {
            constexpr int G = decltype(g)::value;
            V mv[G];
            Runs::vectors(pattern_of.v, v0, mv);
            for (int r = 0; r < rows; ++r)
              for (int q = 0; q < G; ++q) {
                const V gv = runs.load(dy + offs[r][0] + (v0 + q) * VL, partial);
                s[0][q] += gv;
                s[1][q].add_of(grad_term_of, gv, runs.load(x + offs[r][1] + (v0 + q) * VL, partial), mv[q]);
              }
          });
    }
  }
  if (!by_runs) short_row_tiles<2, false>(L, begin, end, nc, sums, rows_of);
  for (int64_t i = 0; i < nc; ++i) {
    sum_dy[i] = static_cast<double>(R::total(sums[0][i]));
    sum_dy_xmu[i] = static_cast<double>(R::total(sums[1][i]));
  }
}

template <class T>
void grad_sums(const T* dy, const T* x, const Layout& L, int64_t begin, int64_t end, acc_t<T> mean,
               double* sum_dy, double* sum_dy_xmu) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int VL = vlen<A>;
  if (L.inner_stride(1) == 1 && with_short_rows<A>(L, 0, [&](auto nv) {
        grad_sums_short_rows_channels<T, decltype(nv)::value, 1>(dy, x, L, 0, 0, 1, begin, end, &mean, sum_dy,
                                                                  sum_dy_xmu);
      }))
    return;
  const int64_t sd = L.inner_stride(0), sx = L.inner_stride(1);
  const V vm = splat(mean);
  // Zero in unused lanes; strided rows gathered into the same lanes.
  auto get = [](const T* p, int64_t s, int64_t i, int64_t n) -> V {
    if (s != 1) return load_strided(p + i * s, s, n);
    return n == VL ? loadv(p + i) : load_partial(p + i, n);
  };
  Lanes2<T> a1, a2;
  if (sd == 1 && sx == 1 && side_by_side<T>(L)) {
    for_row_tiles<2, true>(L, begin, end, [&](const int64_t (*offs)[2], const int64_t* lens, int rows) BN_SEGMENT_BODY {
      walk_tile_vectors<A>(offs, lens[0], rows, [&](const int64_t* off, int64_t i, auto first, int64_t n) BN_SEGMENT_BODY {
        auto& s1 = first ? a1.a : a1.b;
        auto& s2 = first ? a2.a : a2.b;
        const T* dp = dy + off[0] + i;
        const T* xp = x + off[1] + i;
        // Full vectors loaded where they are used: a vector chosen among the load kinds has to
        // exist whole, which for joined halves meant building it on the stack.
        if (n == VL) {
          const V g = loadv(dp);
          s1 += g;
          s2.add_of(grad_term_of, g, loadv(xp), vm);
        } else {
          const V g = load_partial(dp, n);
          s1 += g;
          s2.add_of(grad_term_of, g, load_partial(xp, n), vm);
        }
      });
    });
  } else {
    const int64_t ahead_dy = next_row_prefetch<T>(L, 0), ahead_x = next_row_prefetch<T>(L, 1);
    const bool ahead = sd == 1 && sx == 1 && ahead_dy != 0;
    for_each_segment<2>(L, begin, end, [&](const int64_t* off, int64_t len) BN_SEGMENT_BODY {
      const T* dp = dy + off[0];
      const T* xp = x + off[1];
      walk_vectors<A>(len, [&](int64_t i, auto first, int64_t n) {
        if (ahead) {
          prefetch_at(dp + i, ahead_dy);
          prefetch_at(xp + i, ahead_x);
        }
        auto& s1 = first ? a1.a : a1.b;
        auto& s2 = first ? a2.a : a2.b;
        if (n == VL && sd == 1 && sx == 1) {  // loaded where used (see above)
          const V g = loadv(dp + i);
          s1 += g;
          s2.add_of(grad_term_of, g, loadv(xp + i), vm);
        } else {
          const V g = get(dp, sd, i, n);
          s1 += g;
          s2.add_of(grad_term_of, g, get(xp, sx, i, n), vm);
        }
      });
    });
  }
  *sum_dy = static_cast<double>(a1.total());
  *sum_dy_xmu = static_cast<double>(a2.total());
}

template <class T>
void cl_grad_sums(const T* dy, const T* x, const Layout& L, int64_t p0, int64_t p1, const acc_t<T>* mean,
                  double* sum_dy, double* sum_dy_xmu, acc_t<T>* scratch) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int VL = vlen<A>;
  const int64_t C = L.channels;
  const int64_t Cv = C / VL * VL;
  A* s1 = scratch;
  A* s2 = scratch + C;
  int64_t offs[2][kChannelsLastRun];
  const int64_t* od = offs[0];
  const int64_t* ox = offs[1];
  for (int64_t c = 0; c < C; ++c) sum_dy[c] = sum_dy_xmu[c] = 0.0;
#if defined(__AVX2__) && !defined(__AVX512F__)
  // half_lane_maps (bfloat16 under AVX2): each 16 channels' sums in load_even_odd's order, the
  // 8 even channels then the 8 odd ones, in two registers of 8 lanes, the means laid out so
  // (mean_eo); parked so in s1, s2 and put back in order as they are added up below. Each
  // channel's sum is the same additions in the same order: the same bits.
  scratch_array<A> mean_eo;  // (none for other types: an empty one still costs an allocation)
  if constexpr (half_lane_maps<T>()) {
    mean_eo = scratch_array<A>(static_cast<size_t>(Cv));
    even_odd_copy(mean, mean_eo.data(), Cv);
  }
#endif
  for (int64_t r0 = p0; r0 < p1; r0 += kChannelsLastRun) {
    const int64_t n = std::min(p1, r0 + kChannelsLastRun) - r0;
    position_offsets(L, r0, n, offs);
#if defined(__AVX2__) && !defined(__AVX512F__)
    if constexpr (half_lane_maps<T>()) {
      for_run_tiles<T, VL>(L, Cv, n, [&](int64_t c0, auto nv, int64_t i0, int64_t i1, bool resume) {
        constexpr int NV = decltype(nv)::value;
        f32x8 a[NV][2], b[NV][2], m[NV][2];  // (assigned: `= {}` can become a rep stos per tile)
        for (int k = 0; k < NV; ++k)
          for (int h = 0; h < 2; ++h) {
            const int64_t at = c0 + k * VL + 8 * h;
            a[k][h] = resume ? load_half_lanes(s1 + at) : f32x8{};
            b[k][h] = resume ? load_half_lanes(s2 + at) : f32x8{};
            m[k][h] = load_half_lanes(mean_eo.data() + at);
          }
        for (int64_t i = i0; i < i1; ++i)
          for (int k = 0; k < NV; ++k) {
            f32x8 g[2], v[2];
            load_even_odd(dy + od[i] + c0 + k * VL, g[0], g[1]);
            load_even_odd(x + ox[i] + c0 + k * VL, v[0], v[1]);
            for (int h = 0; h < 2; ++h) {
              a[k][h] += g[h];
              b[k][h] += grad_term(g[h], v[h], m[k][h]);
            }
          }
        for (int k = 0; k < NV; ++k)
          for (int h = 0; h < 2; ++h) {
            std::memcpy(s1 + c0 + k * VL + 8 * h, &a[k][h], sizeof(f32x8));
            std::memcpy(s2 + c0 + k * VL + 8 * h, &b[k][h], sizeof(f32x8));
          }
      });
    } else
#endif
    // Register tiles of channels across the run's positions (see for_run_tiles), each
    // channel's sums in order, parked in s1, s2.
    for_run_tiles<T, VL>(L, Cv, n, [&](int64_t c0, auto nv, int64_t i0, int64_t i1, bool resume) {
      constexpr int NV = decltype(nv)::value;
      AccFor<T> a[NV], b[NV];
      resume_acc<T, NV>(a, s1 + c0, resume);
      resume_acc<T, NV>(b, s2 + c0, resume);
      V m[NV];
      std::memcpy(m, mean + c0, sizeof(m));
      for (int64_t i = i0; i < i1; ++i)
        for (int k = 0; k < NV; ++k) {
          const V g = loadv(dy + od[i] + c0 + k * VL);
          a[k] += g;
          b[k].add_of(grad_term_of, g, loadv(x + ox[i] + c0 + k * VL), m[k]);
        }
      park_acc<T, NV>(a, s1 + c0);
      park_acc<T, NV>(b, s2 + c0);
    });
    // The channels past the last whole vector as in cl_moments: one partial vector per
    // position where loads are masked (the same bits), else channel by channel. Backward, in
    // cache, 1 thread, against channel by channel: 256x24x32x32 NHWC float32 0.76-0.78x the
    // time (AVX2 0.73-0.76x), 256x40x16x16 bfloat16 0.76x, 4099x11 0.69x.
    int64_t c_tail = Cv;
    if constexpr (masked_loads<T>()) {
      if (Cv < C) {
        const int64_t t = C - Cv;
        const V m = load_partial(mean + Cv, t);
        AccFor<T> a, b;
        for (int64_t i = 0; i < n; ++i) {
          const V g = load_partial(dy + od[i] + Cv, t);
          a += g;
          b.add_of(grad_term_of, g, load_partial(x + ox[i] + Cv, t), m);
        }
        store_lanes<A>(s1 + Cv, a.get(), t);
        store_lanes<A>(s2 + Cv, b.get(), t);
        c_tail = C;
      }
    }
    for (int64_t c = c_tail; c < C; ++c) {
      A a = A(0), b = A(0);
      for (int64_t i = 0; i < n; ++i) {
        const A g = load_at(dy + od[i] + c);
        a += g;
        b += grad_term(g, load_at(x + ox[i] + c), mean[c]);
      }
      s1[c] = a;
      s2[c] = b;
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t at = half_lane_maps<T>() && c < Cv ? even_odd_at(c) : c;  // the whole vectors' in even-odd order
      sum_dy[c] += static_cast<double>(s1[at]);
      sum_dy_xmu[c] += static_cast<double>(s2[at]);
    }
  }
}

// grad_sums of nc channels into sum_dy[0..nc), sum_dy_xmu[0..nc): short rows in tiles of rows
// across a block of channels (grad_sums_short_rows_channels), other rows channel by channel.
template <class T>
void grad_sums_channels(const T* dy, const T* x, const Layout& L, int64_t nc, int64_t begin, int64_t end,
                        const acc_t<T>* mean, double* sum_dy, double* sum_dy_xmu) {
  using A = acc_t<T>;
  const int64_t cd = L.channel_stride[0], cx = L.channel_stride[1];
  for (int64_t i0 = 0; i0 < nc; i0 += kBlockChannels) {
    const int64_t m = std::min<int64_t>(kBlockChannels, nc - i0);
    if (!(L.inner_stride(1) == 1 && with_short_rows<A>(L, 0, [&](auto nv) {
            grad_sums_short_rows_channels<T, decltype(nv)::value>(dy + i0 * cd, x + i0 * cx, L, cd, cx, m, begin,
                                                                  end, mean + i0, sum_dy + i0, sum_dy_xmu + i0);
          })))
      for (int64_t i = i0; i < i0 + m; ++i)
        grad_sums(dy + i * cd, x + i * cx, L, begin, end, mean[i], sum_dy + i, sum_dy_xmu + i);
  }
}

}  // namespace batchnorm::cpu::BN_ISA
