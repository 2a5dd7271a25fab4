// The block reductions' walk over short planes that lie back to back (contiguous NCHW with
// planes of 17-63 float or 9-31 double accumulators that are not whole vectors: 5x5, 6x6 and
// 7x7 for float32 and the half types, 3x3 to 5x5 for float64): each row of a block's channels
// read as one run of whole vectors across the planes' boundaries, where ShortRow reads each
// plane in NV vectors, its last mostly masked (a 7x7 plane: 3 1/16 vectors of the run against
// 4), with the same bits.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/kernels.h"
#include "cpu/kernels/short_rows.h"
#include "cpu/kernels/simd.h"
#include "cpu/kernels/walk.h"

namespace batchnorm::cpu::BN_ISA {

// Vectors of a run whose sums a group keeps in registers: a second pass holds three vectors
// per lane (the per-lane pattern, two sums), 24 of AVX-512's 32 registers; a vector is two
// registers under AVX2 and four at baseline, which have 16.
#if defined(__AVX512F__)
constexpr int kRunGroup = 8;
#elif defined(__AVX__)
constexpr int kRunGroup = 2;
#else
constexpr int kRunGroup = 1;
#endif

// Why the bits are ShortRow's: lane l of ShortRow's accumulator k of channel i sums one value
// of the channel's plane (t = k * VL + l, the last vector's lanes t = plane - VL + l) down the
// rows in their order, starting from zero; so does lane i * plane + t of the run, the
// accumulators are all plain lane-wise IEEE sums, and a sum started at +0 never becomes -0
// (the masked lanes' +0 additions change nothing). PlaneRuns gathers the run's lanes back
// into ShortRow's accumulators (zero in its masked lanes) and the caller totals them by the
// same tree as before. A range's partial rows (a reduction piece that starts or ends mid-row)
// put values in ShortRow's lanes counted from the partial row's start: they go through
// ShortRow as before, the first ones (before any whole row) scattered into the run's lanes
// afterwards, the last one added after the gather. Partial rows' lanes are a subset of whole
// rows' (a shorter row's last vector has fewer tail lanes), so the scatter loses none.
template <class T, int NV>
struct PlaneRuns {
  using A = acc_t<T>;
  using V = vec_t<A>;
  using R = ShortRow<T, NV>;
  static constexpr int VL = vlen<A>;
  // Lanes of the longest run: kBlockChannels planes of at most NV vectors.
  static constexpr int64_t kLanes = kBlockChannels * NV * VL;
  using Virtual = AccFor<T>[kBlockChannels][NV];  // ShortRow's accumulators of the block

  const int64_t plane, m, full, rest;  // rest: lanes of the run's partial last vector
  const typename R::Whole whole;
  PlaneRuns(int64_t plane_, int64_t m_)
      : plane(plane_), m(m_), full(m_ * plane_ / VL), rest(m_ * plane_ % VL), whole(R::whole(plane_)) {}

  // Whether to take runs for `values` values of each of m channels: m >= 2 planes of a length
  // that is not a whole number of vectors (fewer vectors than ShortRow's rows), and at least
  // min_rows rows, over which the call's fixed costs spread (the gathers' loads of lanes just
  // stored by the last tile, which wait for the stores to reach the cache, and the patterns).
  // The caller also needs the planes back to back. Either way the same bits.
  static bool pays(int64_t plane, int64_t m, int64_t values, int64_t min_rows) {
    return values >= min_rows * plane && (m * plane + VL - 1) / VL < m * NV;
  }
  // Channel i's ShortRow accumulators into its lanes of the run at p (p + plane - VL first,
  // its masked lanes zero, then the vectors before it over the lanes it shares with them).
  void scatter(const AccFor<T> (&v)[NV], A* p) const {
    const V last = mask_lanes<A>(v[NV - 1].get(), whole.mask);
    std::memcpy(p + plane - VL, &last, sizeof(V));
    for (int k = 0; k + 1 < NV; ++k) {
      const V a = v[k].get();
      std::memcpy(p + k * VL, &a, sizeof(V));
    }
  }
  // Channel i's lanes of the run at p as ShortRow's accumulators.
  void gather(const A* p, AccFor<T> (&v)[NV]) const {
    V a;
    for (int k = 0; k + 1 < NV; ++k) {
      std::memcpy(&a, p + k * VL, sizeof(V));
      v[k] = AccFor<T>::of(a);
    }
    std::memcpy(&a, p + plane - VL, sizeof(V));
    v[NV - 1] = AccFor<T>::of(mask_lanes<A>(a, whole.mask));
  }
  // Zeros in the lanes of the run's partial vector past its values (a scatter writes the
  // values' lanes only).
  void clear_past(A* p) const {
    for (int64_t j = m * plane; j < (full + (rest ? 1 : 0)) * VL; ++j) p[j] = A(0);
  }

  // Calls f(v0, G, partial) for groups of G (a compile-time constant) vectors from v0 covering
  // the run: kRunGroup whole vectors at a time, the rest in one group, then the partial
  // vector alone (G = 1, partial true: rest lanes).
  template <class F>
  inline __attribute__((always_inline)) void for_groups(F&& f) const {
    int64_t v0 = 0;
    for (; v0 + kRunGroup <= full; v0 += kRunGroup) f(v0, std::integral_constant<int, kRunGroup>{}, std::false_type{});
    if constexpr (kRunGroup > 1) {
      switch (full - v0) {
        case 1: f(v0, std::integral_constant<int, 1>{}, std::false_type{}); break;
        case 2: if constexpr (kRunGroup > 2) f(v0, std::integral_constant<int, 2>{}, std::false_type{}); break;
        case 3: if constexpr (kRunGroup > 3) f(v0, std::integral_constant<int, 3>{}, std::false_type{}); break;
        case 4: if constexpr (kRunGroup > 4) f(v0, std::integral_constant<int, 4>{}, std::false_type{}); break;
        case 5: if constexpr (kRunGroup > 5) f(v0, std::integral_constant<int, 5>{}, std::false_type{}); break;
        case 6: if constexpr (kRunGroup > 6) f(v0, std::integral_constant<int, 6>{}, std::false_type{}); break;
        case 7: if constexpr (kRunGroup > 7) f(v0, std::integral_constant<int, 7>{}, std::false_type{}); break;
        default: break;
      }
    }
    if (rest) f(full, std::integral_constant<int, 1>{}, std::true_type{});
  }

  // One reduction of K sums over values [begin, end) of the block (begin < end; channel i of
  // every array at i * plane from its first: planes back to back, which the caller checks with
  // planes_back_to_back), into virt[j]
  // (ShortRow's accumulators of sum j, every channel), through the run's lanes packed[j]:
  //   row_tile(offs, lens, rows, i, acc): ShortRow's walk of channel i over a tile of partial
  //     rows into acc[j][k] (fresh zeros or the sums so far);
  //   group(offs, rows, v0, G, partial, s): the run's vectors [v0, v0 + G) of a tile of whole
  //     rows into s[j][g] (rows[r]'s run at offs[r][t] of array t).
  template <int NT, int K, class RowTile, class Group>
  void reduce(const Layout& L, int64_t begin, int64_t end, A (&packed)[K][kLanes], Virtual (&virt)[K],
              RowTile&& row_tile, Group&& group) const {
    bool started = false, whole_seen = false, gathered = false;
    auto virtual_tile = [&](const int64_t (*offs)[NT], const int64_t* lens, int rows, bool fresh)
                            __attribute__((always_inline)) {
      for (int64_t i = 0; i < m; ++i) {
        AccFor<T> acc[K][NV];
        if (!fresh)
          for (int j = 0; j < K; ++j)
            for (int k = 0; k < NV; ++k) acc[j][k] = virt[j][i][k];
        row_tile(offs, lens, rows, i, acc);
        for (int j = 0; j < K; ++j)
          for (int k = 0; k < NV; ++k) virt[j][i][k] = acc[j][k];
      }
    };
    auto gather_all = [&]() {
      for (int j = 0; j < K; ++j)
        for (int64_t i = 0; i < m; ++i) gather(packed[j] + i * plane, virt[j][i]);
      gathered = true;
    };
    for_row_tiles<NT, true>(L, begin, end, [&](const int64_t (*offs)[NT], const int64_t* lens, int rows) {
      if (lens[0] != plane) {
        if (!whole_seen) {  // the range's first rows: through ShortRow, then into the run's lanes
          virtual_tile(offs, lens, rows, !started);
          for (int j = 0; j < K; ++j) {
            for (int64_t i = 0; i < m; ++i) scatter(virt[j][i], packed[j] + i * plane);
            clear_past(packed[j]);
          }
        } else {  // its last row: after the whole rows, back in ShortRow's accumulators
          if (!gathered) gather_all();
          virtual_tile(offs, lens, rows, false);
        }
        started = true;
        return;
      }
      const bool resume = started;
      for_groups([&](int64_t v0, auto g, auto partial) __attribute__((always_inline)) {
        constexpr int G = decltype(g)::value;
        AccFor<T> s[K][G];
        if (resume)
          for (int j = 0; j < K; ++j)
            for (int q = 0; q < G; ++q) s[j][q] = AccFor<T>::resume(packed[j] + (v0 + q) * VL);
        group(offs, rows, v0, g, partial, s);
        for (int j = 0; j < K; ++j)
          for (int q = 0; q < G; ++q) s[j][q].park(packed[j] + (v0 + q) * VL);
      });
      started = whole_seen = true;
    });
    if (!gathered) gather_all();
  }

  // A per-lane pattern of the block's channels: lane i * plane + t holds 0 + value[i] (as
  // splat gives ShortRow's vectors), zeros past the run's values.
  void pattern(const A* value, A* out) const {
    for (int64_t i = 0; i < m; ++i) {
      // A vector per VL lanes of the plane, the last one ending at the plane's end.
      const V v = splat(value[i]);
      A* p = out + i * plane;
      for (int k = 0; k + 1 < NV; ++k) std::memcpy(p + k * VL, &v, sizeof(V));
      std::memcpy(p + plane - VL, &v, sizeof(V));
    }
    clear_past(out);
  }
  // Vectors [v0, v0 + G) of a pattern, for a group.
  template <int G>
  static inline __attribute__((always_inline)) void vectors(const A* pattern, int64_t v0, V (&out)[G]) {
    for (int q = 0; q < G; ++q) std::memcpy(&out[q], pattern + (v0 + q) * VL, sizeof(V));
  }
  // The run's vector v0 + q of the row at p: whole, or the partial one's rest lanes.
  template <class P>
  inline __attribute__((always_inline)) V load(const T* p, P partial) const {
    if constexpr (P::value) return load_partial(p, rest);
    else return loadv(p);
  }
};

}  // namespace batchnorm::cpu::BN_ISA
