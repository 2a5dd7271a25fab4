// Short contiguous rows (a 7x7 plane's 49 values): ShortRow, the vectors that cover one row,
// and with_short_rows, the test that a layout's rows are short; shared by the reductions'
// row walks (kernels/moments.h, kernels/gradient.h, kernels/plane_runs.h) and the maps.
#pragma once
#include <cstdint>
#include <type_traits>

#include "core/layout.h"
#include "cpu/kernels/simd.h"
#include "cpu/kernels/walk.h"

namespace batchnorm::cpu::BN_ISA {

// Short contiguous rows (a 7x7 plane is 49 values, spaced C * 49 apart) spend most of a
// generic walk's time per row, in the partial vector at the row's end. Rows of at most
// kShortRowVectors vectors go through ShortRow instead: the row's full vectors, then for a
// tail the full vector that ends at the row's end with the lanes the previous vector already
// covered masked off; vector k of every row goes to accumulator k. Whether a reduction takes
// ShortRow depends on the shape alone; the block reductions may instead read a block's rows as
// runs across its planes (kernels/plane_runs.h, chosen by the block's channel count, which
// depends on the thread count), which give ShortRow's bits, so results stay the same for any
// thread count or ISA.
constexpr int kShortRowVectors = 4;

// Storage for a T left unwritten on construction (T trivially copyable): arrays of
// accumulators, which zero themselves, that the caller writes before reading. The short-row
// statistics' three arrays (4 KB each for 7x7 planes), zeroed at every call, had cost small
// batches in cache a tenth of their time: AMD EPYC Zen 4, 1 thread, A/B both orders,
// 8x2048x7x7 float32 0.91-0.92x, 4x256x5x5 0.86x, bfloat16 0.91x; from memory (256x2048x7x7)
// 0.99-1.03x.
template <class T>
struct Unset {
  static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_destructible_v<T>,
                "Unset holds plain values: written by copies, never destroyed");
  union {
    T v;
  };
  Unset() {}
};

template <class T, int NV>
struct ShortRow {
  using A = acc_t<T>;
  using V = vec_t<A>;
  static constexpr int VL = vlen<A>;
  // f(k, v, mask, masked) for vector k of the row of len (<= NV * VL) values at p; when
  // `masked`, v's lanes outside `mask` are zero and results built from v need the mask again.
  template <class F>
  static inline __attribute__((always_inline)) void each(const T* p, int64_t len, F&& f) {
    const int64_t full = len / VL, tail = len - full * VL;
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) {
      if (k < full) {
        f(k, loadv(p + k * VL), V{}, false);
      } else if (k == full && tail != 0) {
        if (len >= VL) {
          const V m = lanes_from<A>(VL - tail);
          f(k, mask_lanes<A>(loadv(p + len - VL), m), m, true);
        } else {
          f(k, load_partial(p, len), lanes_below<A>(len), true);
        }
      }
    }
  }
  // A row of the walk's full length (every row of a tile but a range's partial ones): its
  // last vector's offset and mask, computed once per call rather than per row. Tail or none,
  // the last vector is the one that ends at the row's end, masked (by all lanes when the row
  // is whole vectors: the same values as each()'s unmasked one), so the loop over a tile's
  // rows holds no branch on the length.
  struct Whole {
    int64_t len, last;
    V mask;
  };
  static Whole whole(int64_t len) { return {len, len - VL, lanes_from<A>((VL - len % VL) % VL)}; }
  // each() for a row of the Whole's length, which must span NV vectors: (NV - 1) * VL < len
  // <= NV * VL, and len >= VL (with_short_rows' NV; a shorter len would add a vector twice).
  template <class F>
  static inline __attribute__((always_inline)) void each(const T* p, const Whole& w, F&& f) {
#pragma GCC unroll 8
    for (int k = 0; k + 1 < NV; ++k) f(k, loadv(p + k * VL), V{}, false);
    f(NV - 1, mask_lanes<A>(loadv(p + w.last), w.mask), w.mask, true);
  }
  // each() for the rows of a Uniform tile of for_row_tiles (row r at p + offs[r][0]): whole
  // rows through the Whole, a range's partial rows through their lengths.
  template <class F>
  static inline __attribute__((always_inline)) void each_of_tile(const T* p, const int64_t (*offs)[1],
                                                                 const int64_t* lens, int rows, const Whole& w, F&& f) {
    if (lens[0] == w.len)
      for (int r = 0; r < rows; ++r) each(p + offs[r][0], w, f);
    else
      for (int r = 0; r < rows; ++r) each(p + offs[r][0], lens[r], f);
  }
  template <int N>
  static inline __attribute__((always_inline)) A total(const AccFor<T> (&acc)[N]) {
    A t = A(0);
    for (int k = 0; k < N; ++k) t += acc[k].total();
    return t;
  }
};

// Calls f(std::integral_constant<int, NV>{}) when rows of array t are short and contiguous
// (NV = their length in vectors), and returns whether it did.
template <class A, class F>
static inline __attribute__((always_inline)) bool with_short_rows(const Layout& L, int t, F&& f) {
  constexpr int VL = vlen<A>;
  const int64_t inner = L.inner();
  if (L.inner_stride(t) != 1 || inner < VL || inner > kShortRowVectors * VL) return false;
  switch ((inner + VL - 1) / VL) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 3: f(std::integral_constant<int, 3>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    default: return false;
  }
}

// ShortRow's walk of a block of nc channels over values [begin, end): tile by tile of rows
// (for_row_tiles), channel by channel within a tile, row_tile(offs, lens, rows, i, acc) adding
// the tile's rows of channel i into its K sums acc[j][k], which stay in registers across the
// tile and in virt[j][i] between tiles (the first tile's fresh zeros; every sum zero when there
// are no values).
template <int NT, bool Uniform, class Acc, int K, int MaxC, int NV, class RowTile>
static inline __attribute__((always_inline)) void short_row_tiles(const Layout& L, int64_t begin, int64_t end,
                                                                  int64_t nc, Acc (&virt)[K][MaxC][NV],
                                                                  RowTile&& row_tile) {
  bool first = true;
  for_row_tiles<NT, Uniform>(L, begin, end, [&](const int64_t (*offs)[NT], const int64_t* lens, int rows) {
    for (int64_t i = 0; i < nc; ++i) {
      Acc acc[K][NV];
      if (!first)
        for (int j = 0; j < K; ++j)
          for (int k = 0; k < NV; ++k) acc[j][k] = virt[j][i][k];
      row_tile(offs, lens, rows, i, acc);
      for (int j = 0; j < K; ++j)
        for (int k = 0; k < NV; ++k) virt[j][i][k] = acc[j][k];
    }
    first = false;
  });
  if (first)
    for (int j = 0; j < K; ++j)
      for (int64_t i = 0; i < nc; ++i)
        for (int k = 0; k < NV; ++k) virt[j][i][k] = Acc{};
}

}  // namespace batchnorm::cpu::BN_ISA
