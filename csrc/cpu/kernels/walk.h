// Walking helpers of the kernels: an odometer over the layout's reduced dims, the row
// segments of a channels-first range, channels-last position offsets, and whether positions
// are aligned for streaming stores. (The fixed-order sum of reduction lanes is Acc::total,
// kernels/simd.h.)
#pragma once
#include <algorithm>
#include <cstdint>

#include "core/layout.h"

namespace batchnorm::cpu::BN_ISA {

// Increments a multi-index over dims [0, nd) of the layout, tracking each array's offset.
template <int NT>
struct Odometer {
  const Layout& L;
  int nd;
  int64_t idx[kMaxDims];
  int64_t off[NT];
  Odometer(const Layout& layout, int ndims, int64_t linear) : L(layout), nd(ndims) {
    for (int t = 0; t < NT; ++t) off[t] = 0;
    if (linear == 0) {  // the usual start, without a division per dim
      for (int d = 0; d < nd; ++d) idx[d] = 0;
      return;
    }
    for (int d = nd - 1; d >= 0; --d) {
      idx[d] = linear % L.sizes[d];
      linear /= L.sizes[d];
      for (int t = 0; t < NT; ++t) off[t] += idx[d] * L.strides[t][d];
    }
  }
  void next() {
    for (int d = nd - 1; d >= 0; --d) {
      for (int t = 0; t < NT; ++t) off[t] += L.strides[t][d];
      if (++idx[d] < L.sizes[d]) return;
      for (int t = 0; t < NT; ++t) off[t] -= L.sizes[d] * L.strides[t][d];
      idx[d] = 0;
    }
  }
};

// Offsets in array t of positions [p, p + n) (channels-last runs) into off[t][0..n). One
// reduced dim (contiguous NHWC, (N, C)) is an arithmetic progression; the odometer's
// member-by-member updates, stored next to the offsets, cost 13% of 32x64x56x56 NHWC
// statistics on the Xeon.
template <int NT, int64_t Cap>
inline void position_offsets(const Layout& L, int64_t p, int64_t n, int64_t (&off)[NT][Cap]) {
  if (L.nred == 1) {
    for (int t = 0; t < NT; ++t) {
      const int64_t s = L.strides[t][0];
      int64_t o = p * s;
      for (int64_t i = 0; i < n; ++i, o += s) off[t][i] = o;
    }
    return;
  }
  Odometer<NT> pos(L, L.nred, p);
  for (int64_t i = 0; i < n; ++i, pos.next())
    for (int t = 0; t < NT; ++t) off[t][i] = pos.off[t];
}

// Marks a lambda given to for_each_segment as inlined into it. Left to itself GCC outlined the
// per-channel reductions' bodies, and the accumulators they add to went to memory (added
// through pointers, zeroed at every call): with a 196-value plane per call, 1x256x14x14
// float32 backward took 142-149 us on one AMD EPYC thread (AVX2), 90 us with the bodies inlined
// (and -mmove-max, csrc/CMakeLists.txt).
#ifndef BN_SEGMENT_BODY
#define BN_SEGMENT_BODY __attribute__((always_inline))
#endif

// Calls f(off, len) for each row segment of values [begin, end) of one channel's walk:
// off[t] is the segment's first element offset in array t, rows run along the inner dim.
// Inlined, so that accumulators the caller's f adds to can stay in registers (see
// BN_SEGMENT_BODY).
template <int NT, class F>
static inline __attribute__((always_inline)) void for_each_segment(const Layout& L, int64_t begin, int64_t end,
                                                                   F&& f) {
  const int64_t inner = L.inner();
  int64_t i = begin % inner;
  Odometer<NT> rows(L, L.nred - 1, begin / inner);
  for (int64_t pos = begin; pos < end;) {
    const int64_t len = std::min(inner - i, end - pos);
    int64_t off[NT];
    for (int t = 0; t < NT; ++t) off[t] = rows.off[t] + i * L.strides[t][L.nred - 1];
    f(off, len);
    pos += len;
    i = 0;
    rows.next();
  }
}

// Elements from a value of array t's rows to the same value of the next row of the walk (the
// next plane of an NCHW channel, C planes on), which the channels-first reductions of half
// types that go row by row (contiguous rows outside the short-row tiles: longer than four
// vectors, or shorter than one) prefetch as they read each vector: the next row is then on its
// way while the prefetchers are still learning the current one, which a row of a half type
// (6 KB for 56x56) leaves them little time to do. 0 (nothing to prefetch) for other types and
// walks of one reduced dim. AMD EPYC Zen 4, 2 threads, data from memory: 32x64x56x56 training
// bfloat16 and float16 0.93x the time, backward 0.91-0.93x (1 thread 0.89x), 64x256x28x28
// bfloat16 backward 0.88x; in cache (a hot loop) 0.82-1.01x; float32 0.98-1.06x, so float32
// does without. (Rows shorter than a vector are unmeasured.)
// `reach`: rows shorter than kRowPrefetchBytes are fetched as many rows ahead as reach that
// far, at most kRowPrefetchMaxRows: one row of a 14x14 half plane (392 bytes) is read before
// its prefetch lands. The backward's sums take it (grad_sums): backward, 3-4 rows ahead
// against one, in-process, 64 MB scrub, NumPy arrays: 64x512x14x14 bfloat16 0.82-0.95x the
// time at 2 threads, 0.90-0.91x at 1; float16 0.82-0.97x; 128x256x14x14 float16 0.92-0.94x;
// 256x512x10x10 bfloat16 0.90-0.99x (4 rows); tools/ab_lib (aligned arrays) 0.93-1.00x. 28x28
// and 56x56 rows (one row ahead either way) were mixed with more rows (0.94-1.10x). The
// statistics do without: 4 rows ahead made 64x512x14x14 bfloat16 statistics 1.04-1.08x.
constexpr int64_t kRowPrefetchBytes = 1024;
constexpr int64_t kRowPrefetchMaxRows = 4;
template <class T>
inline int64_t next_row_prefetch(const Layout& L, int t, bool reach = false) {
  if constexpr (sizeof(T) != 2) return 0;
  if (L.nred < 2) return 0;
  const int64_t row_bytes = std::max<int64_t>(1, L.inner() * static_cast<int64_t>(sizeof(T)));
  const int64_t rows = reach ? std::min(kRowPrefetchMaxRows, (kRowPrefetchBytes + row_bytes - 1) / row_bytes) : 1;
  return rows * L.strides[t][L.nred - 2];
}

// The address `elements` elements from p, computed as an integer: past the array's end (the
// walk's last row) or before its start (negative strides) it is no pointer into the array,
// and a prefetch of it is harmless. For prefetches only.
template <class T>
static inline __attribute__((always_inline)) uintptr_t address_ahead(const T* p, int64_t elements) {
  return reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(elements * int64_t(sizeof(T)));
}

// Prefetches the line `elements` elements from p (address_ahead).
template <class T>
static inline __attribute__((always_inline)) void prefetch_at(const T* p, int64_t elements) {
  __builtin_prefetch(reinterpret_cast<const void*>(address_ahead(p, elements)));
}

// Rows read together as separate streams: a walk that reads one short piece of each row, rows
// far apart, waits on memory for most of them (the hardware prefetchers need a few lines of a
// stream to follow it); one that goes down kStreamRows rows at a time, reading each piece of
// them, gives the prefetchers kStreamRows streams to follow. 8 and 16 ran alike, 32 slower
// (channels-last runs, kernels/gradient.h); reading 102 MB as 16-plane pieces of 7x7 rows on an
// AMD EPYC Zen 4, 1 thread: 10.3 ms a row at a time, 5.7 / 5.3 / 5.8 / 7.5 ms 4 / 8 / 16 / 32
// rows at a time (a sequential read 4.8 ms).
constexpr int kStreamRows = 8;

// Calls f(offs, lens, n) for each tile of n (<= kStreamRows) consecutive row segments of
// values [begin, end) of the walk (for_each_segment's), segment r at offset offs[r][t] of array
// t and lens[r] values long. Reduced dims (outer, inner) step a pointer per row rather than
// the odometer, whose per-row bookkeeping showed on short rows.
template <int NT, class F>
static inline __attribute__((always_inline)) void for_row_tiles(const Layout& L, int64_t begin, int64_t end, F&& f) {
  int64_t offs[kStreamRows][NT], lens[kStreamRows];
  int n = 0;
  auto add = [&](const int64_t* off, int64_t len) __attribute__((always_inline)) {
    for (int t = 0; t < NT; ++t) offs[n][t] = off[t];
    lens[n] = len;
    if (++n == kStreamRows) {
      f(offs, lens, n);
      n = 0;
    }
  };
  if (L.nred != 2) {
    for_each_segment<NT>(L, begin, end, add);
  } else {
    const int64_t inner = L.sizes[1];
    int64_t o = begin / inner, i = begin - o * inner;
    int64_t off[NT];
    for (int t = 0; t < NT; ++t) off[t] = o * L.strides[t][0] + i * L.strides[t][1];
    for (int64_t pos = begin; pos < end;) {
      const int64_t len = std::min(inner - i, end - pos);
      add(off, len);
      pos += len;
      for (int t = 0; t < NT; ++t) off[t] += L.strides[t][0] - i * L.strides[t][1];
      i = 0;
    }
  }
  if (n) f(offs, lens, n);
}

// Elements of T from p to the next `align`-byte boundary (0 when p is on one).
template <class T>
inline int64_t elements_to_boundary(const T* p, int64_t align) {
  const auto a = static_cast<uintptr_t>(align);
  return static_cast<int64_t>((a - reinterpret_cast<uintptr_t>(p) % a) % a / sizeof(T));
}

// Whether every position of array t starts on an `align`-byte boundary, as the streaming
// stores of whole channel vectors need: the base address alone is not enough when rows of
// positions are padded (an out= view of a wider buffer), nor with any other stride.
template <class T>
inline bool positions_aligned(const Layout& L, int t, const T* base, int64_t align) {
  if (reinterpret_cast<uintptr_t>(base) % static_cast<uintptr_t>(align) != 0) return false;
  for (int d = 0; d < L.nred; ++d)
    if (L.sizes[d] > 1 && (L.strides[t][d] * static_cast<int64_t>(sizeof(T))) % align != 0) return false;
  return true;
}

}  // namespace batchnorm::cpu::BN_ISA
