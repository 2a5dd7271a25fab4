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
// types prefetch as they read each vector where they read rows one after the other (longer
// than kSideBySideRowBytes): the next row is then on its way while the prefetchers are still
// learning the current one. 0 (nothing to prefetch) for other types and walks of one reduced
// dim. AMD EPYC Zen 4, 2 threads, data from memory, when it was the rule for every row: 32x64x56x56
// training bfloat16 and float16 0.93x the time, backward 0.91-0.93x; float32 0.98-1.06x, so
// float32 does without.
template <class T>
inline int64_t next_row_prefetch(const Layout& L, int t) {
  if constexpr (sizeof(T) != 2) return 0;
  if (L.nred < 2) return 0;
  return L.strides[t][L.nred - 2];
}

// The address `elements` elements of T from the address a (address_plus) or from p
// (address_ahead), computed as an integer: past the array's end (the walk's last row) or
// before its start (negative strides) it is no pointer into the array, and a prefetch of it
// is harmless. For prefetches only.
template <class T>
static inline __attribute__((always_inline)) uintptr_t address_plus(uintptr_t a, int64_t elements) {
  return a + static_cast<uintptr_t>(elements * int64_t(sizeof(T)));
}
template <class T>
static inline __attribute__((always_inline)) uintptr_t address_ahead(const T* p, int64_t elements) {
  return address_plus<T>(reinterpret_cast<uintptr_t>(p), elements);
}

// Pages of 4 KB, the size Linux gives anonymous memory unless it is on transparent huge pages:
// torch's tensors (the allocator's default), malloc's, aligned_alloc's. NumPy madvises its large
// arrays onto huge pages where the kernel's THP mode is `madvise`. On a VM every TLB miss is a
// nested walk (guest and host page tables), and a stream that enters a new page every 4 KB
// waits on them: on the AMD EPYC Zen 4 VM, one thread's sequential read ran at 17-19 GB/s on
// 4 KB pages against 30-34 GB/s on huge pages (a C model, 25 MB, 64 MB scrub), a read with
// streamed writes at 28-31 against 38-42 GB/s, and the library's inference of 256x2048x7x7 and
// 4096x1024 float32 (2 threads, bench/torch_pages.py) took 1.2-2.0x as long on torch's tensors
// as on huge pages.
constexpr int64_t kPageBytes = 4096;

// One prefetch in each 4 KB page of the n values `elements` elements past p (the first line,
// then each page's first), with little temporal locality (prefetcht2): the point is the
// page's translation, which the prefetch leaves in the TLB, and a line to start the page's
// stream. Outputs' pages take the same read prefetch: a line owned for writing (prefetchw)
// and then streamed over is written back first (see map_run_block). Integer addresses: the
// range may lie past the array's end.
template <class T>
static inline __attribute__((always_inline)) void touch_pages(const T* p, int64_t elements, int64_t n) {
  uintptr_t a = address_ahead(p, elements);
  const uintptr_t e = address_plus<T>(a, n);
  while (a < e) {
    __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 1);
    a = (a | (kPageBytes - 1)) + 1;
  }
}

// Prefetches the line `elements` elements from p (address_ahead).
template <class T>
static inline __attribute__((always_inline)) void prefetch_at(const T* p, int64_t elements) {
  __builtin_prefetch(reinterpret_cast<const void*>(address_ahead(p, elements)));
}

// Prefetches values [begin, end) of one channel's contiguous rows with prefetcht1 (into L2 on
// the AMD EPYC Zen 4: prefetcht0 made a C model of the loop slower), a cache line per step (a
// row part that starts mid-line leaves its last line to the hardware), in walk order: a
// reduction's second pass over a block in L1, which reads nothing from memory, fetches the
// next block meanwhile, so that the memory does not idle while it computes
// (kernels/moments.h). Addresses are integers: the range may lie past the array's end (a last
// channel's next). The caller keeps the row's span in registers (Span::step); rows advance in a
// call of their own (with the span in memory, its store and reload on every step had been a
// fifth of the pass).
template <class T>
struct LinePrefetcher {
  struct Span {
    uintptr_t at, end;  // the next line to fetch, the end of its row's part
    inline __attribute__((always_inline)) void step(LinePrefetcher& rows) {
      if (at < end) {
        __builtin_prefetch(reinterpret_cast<const void*>(at), 0, 2);
        at += 64;
      } else if (rows.left > 0) {
        *this = rows.next_span();  // never empty: left > 0
        __builtin_prefetch(reinterpret_cast<const void*>(at), 0, 2);
        at += 64;
      }
    }
  };
  uintptr_t base;
  int64_t inner, i, left;  // the row's first value in the range, values left from there
  Odometer<1> rows;
  // Values [begin, end) of the channel `shift` elements from x's (0: x's own).
  LinePrefetcher(const T* x, const Layout& L, int64_t begin, int64_t end, int64_t shift = 0)
      : base(address_ahead(x, shift)), inner(L.inner()), i(begin % L.inner()),
        left(std::max<int64_t>(0, end - begin)), rows(L, L.nred - 1, begin / L.inner()) {}
  // The current row's part of the range; then moves to the next row.
  __attribute__((noinline)) Span next_span() {
    const int64_t n = std::min(inner - i, left);
    const uintptr_t at = address_plus<T>(base, rows.off[0] + i);
    left -= n;
    i = 0;
    rows.next();
    return {at, address_plus<T>(at, n)};
  }
};

// Rows read together as separate streams: a walk that reads one short piece of each row, rows
// far apart, waits on memory for most of them (the hardware prefetchers need a few lines of a
// stream to follow it); one that goes down kStreamRows rows at a time, reading each piece of
// them, gives the prefetchers kStreamRows streams to follow. 8 and 16 ran alike, 32 slower
// (channels-last runs, kernels/gradient.h); reading 102 MB as 16-plane pieces of 7x7 rows on an
// AMD EPYC Zen 4, 1 thread: 10.3 ms a row at a time, 5.7 / 5.3 / 5.8 / 7.5 ms 4 / 8 / 16 / 32
// rows at a time (a sequential read 4.8 ms).
constexpr int kStreamRows = 8;

// Whether the channels-first reductions read a range's rows side by side, kStreamRows at a
// time (moments' first pass, the backward's sums: walk_tile_vectors), rather than one after
// the other: for contiguous rows of at most kSideBySideRowBytes. A row of 1-6 KB (NCHW
// 14x14-40x40 float32, up to 56x56 half) read alone ends before the prefetchers have followed
// it far, and the channel's next row is C planes on. AMD EPYC Zen 4, data from memory, 2
// threads, in-process, both orders, against rows one after the other (half types prefetching
// the next row as they went, which this replaces): statistics 64x256x28x28 float32 0.77-0.78x
// the time, bfloat16 0.89-0.91x, 64x512x14x14 0.91-0.93x (bfloat16 0.79-0.80x), 32x64x56x56
// bfloat16 1.05-1.06x; training 64x256x28x28 0.88-0.91x (1 thread 0.84x), 64x512x14x14
// bfloat16 0.81-0.83x; backward 64x256x28x28 float32 0.84-0.86x (1 thread 0.79x),
// 64x512x14x14 0.77x; 32x64x56x56 bfloat16 training and backward level. Against rows one
// after the other without prefetches: 64x64x40x40 float32 0.81x, 32x64x56x56 bfloat16
// 0.90-0.92x, but 56x56 float32 (12.5 KB) 1.00-1.03x and 112x112 bfloat16 0.98-1.03x: longer
// rows go one after the other (half types prefetching the next row, next_row_prefetch). The
// rule reads the shape and the type alone: the order of the additions, and the bits, depend on
// neither the machine nor the thread count.
constexpr int64_t kSideBySideRowBytes = 8192;
template <class T>
inline bool side_by_side(const Layout& L) {
  return L.inner() * static_cast<int64_t>(sizeof(T)) <= kSideBySideRowBytes;
}

// Calls f(offs, lens, n) for each tile of n (<= kStreamRows) consecutive row segments of
// values [begin, end) of the walk (for_each_segment's), segment r at offset offs[r][t] of array
// t and lens[r] values long. Reduced dims (outer, inner) step a pointer per row rather than
// the odometer, whose per-row bookkeeping showed on short rows. `Uniform`: every tile's
// segments are equally long (a range that starts or ends mid-row has its partial rows in
// tiles of their own), for walks that go down a tile's rows side by side.
template <int NT, bool Uniform = false, class F>
static inline __attribute__((always_inline)) void for_row_tiles(const Layout& L, int64_t begin, int64_t end, F&& f) {
  int64_t offs[kStreamRows][NT], lens[kStreamRows];
  int n = 0;
  auto add = [&](const int64_t* off, int64_t len) __attribute__((always_inline)) {
    if (Uniform && n > 0 && len != lens[0]) {
      f(offs, lens, n);
      n = 0;
    }
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

// Whether every array's planes lie back to back (a channel's plane right after the previous
// channel's, as in contiguous NCHW), so that a block of channels' rows of one outer index
// are one run (the maps' map_run_block, the reductions' PlaneRuns).
inline bool planes_back_to_back(const Layout& L, int arrays) {
  for (int t = 0; t < arrays; ++t)
    if (L.inner_stride(t) != 1 || L.channel_stride[t] != L.inner()) return false;
  return true;
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
