// The elementwise executor's primitives: out = R::map(k, in...) for a recipe R of
// core/recipes.h (normalize and its fused variants, dx, the ReLU gradient) over a
// channels-first block of one channel, or over every channel of channels-last positions.
// The recipe's formula serves the vector body and the scalar tail alike. Inputs may alias the
// output (y = x, dx = dy): every value is read before its position is written. `nt` selects
// non-temporal stores, for outputs too large to stay in cache (they skip the
// read-for-ownership of the output).
#pragma once
#include <algorithm>
#include <numeric>
#include <vector>

#include "core/recipes.h"
#include "cpu/kernels/moments.h"
#include "cpu/kernels/simd.h"
#include "cpu/kernels/walk.h"
#include "cpu/scratch.h"

namespace batchnorm::cpu::BN_ISA {

template <class R>
constexpr int coef_slots = R::kCoef > 0 ? R::kCoef : 1;

// Whether R is one of the forward's maps (normalize, with or without residual and ReLU).
template <class R>
constexpr bool kForwardMap = false;
template <bool Residual, Activation Act>
constexpr bool kForwardMap<ForwardMap<Residual, Act>> = true;

// apply_map on vectors loaded from T. The ReLU gradient of float16 vectors under AVX2 (joined
// from halves, joined_halves) splits them by shuffles (relu_grad_joined, core/recipes.h): the
// memcpy split that every other type takes for free spilled them, 2.5-4x the time of
// float16's fused backward with the shuffle split (AMD EPYC Zen 4, AVX2 level, 32x64x28x28 in
// cache, 1 thread). So does bfloat16's under AVX2 (half_lane_maps), whose maps with splat
// coefficients load joined halves too (loadv_unordered): 3-3.7x the time of the fused
// backward before, 8x64x56x56 NCHW in cache on AMD EPYC Zen 3, when ec5ee03 joined them
// without this. The same operations: the same bits.
template <class T, class R, class V>
static inline __attribute__((always_inline)) V apply_vector_map(R, const V* k, const V* in) {
  if constexpr (std::is_same_v<R, ReluGradMap> && (joined_halves<T>() || half_lane_maps<T>()))
    return relu_grad_joined(in[0], in[1]);
  else
    return apply_map(R{}, k, in);
}

// One output value, from inputs p[j][i * s[j]] to o[i * so] (the scalar path); Unit: every
// stride is 1.
template <class R, bool Unit, class T>
static inline __attribute__((always_inline)) void map_one(const acc_t<T>* k, const T* const* p, T* o, int64_t i,
                                                          const int64_t* s = nullptr, int64_t so = 1) {
  acc_t<T> v[R::kIn];
  #pragma GCC unroll 4
  for (int j = 0; j < R::kIn; ++j) v[j] = load_at(p[j] + (Unit ? i : i * s[j]));
  store_at(o + (Unit ? i : i * so), apply_map(R{}, k, v));
}

// map_one with value i's coefficients gathered from per-channel arrays: coefficient j is
// k[j][c] (c the value's channel, or its index into arrays expanded per value).
template <class R, class T>
static inline __attribute__((always_inline)) void map_one_at(const acc_t<T>* const* k, int64_t c, const T* const* p,
                                                             T* o, int64_t i) {
  acc_t<T> kc[coef_slots<R>];
  #pragma GCC unroll 4
  for (int j = 0; j < R::kCoef; ++j) kc[j] = k[j][c];
  map_one<R, true, T>(kc, p, o, i);
}

// Values [at, at + n) of every array (n below a vector) as one partial vector, coefficient j's
// lanes in kv[j]: the rows' tails in map_contiguous (the channel's coefficients splat) and the
// channels past the last whole vector in map_positions (the channels' own). Where partial
// loads and stores are masked (masked_partials) the same operations lane by lane as value by
// value, so the same bits.
template <class R, class T>
static inline __attribute__((always_inline)) void map_partial(const T* const* p, T* o, int64_t at, int64_t n,
                                                              const vec_t<acc_t<T>>* kv) {
  vec_t<acc_t<T>> v[R::kIn];
  #pragma GCC unroll 4
  for (int j = 0; j < R::kIn; ++j) v[j] = load_partial(p[j] + at, n);
  store_partial(o + at, apply_vector_map<T>(R{}, kv, v), n);
}

// A contiguous run of n values of every array.
template <class R, class T>
static inline __attribute__((always_inline)) void map_contiguous(const acc_t<T>* k, const vec_t<acc_t<T>>* kv,
                                                                 const T* const* p, T* o, int64_t n, bool nt) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int VL = vlen<A>;
  int64_t i = 0;
  // The coefficients in locals: through the caller's pointer they could alias the output (a
  // vector of A aliases A), and every store would force them to be reloaded.
  V kl[coef_slots<R>];
  #pragma GCC unroll 4
  for (int j = 0; j < R::kCoef; ++j) kl[j] = kv[j];
  // In the lane order storev_unordered puts back (the coefficients are splat; storev2's
  // levels keep loadv's order).
  auto vec_at = [&](int64_t at) {
    V v[R::kIn];
    #pragma GCC unroll 4
    for (int j = 0; j < R::kIn; ++j) v[j] = loadv_unordered(p[j] + at);
    return apply_vector_map<T>(R{}, kl, v);
  };
  if (nt) {
    // Streaming stores write whole cache lines only, line_vectors<T> vectors at a time; the values
    // before the output's first line boundary (one by one up to the vector alignment, then a
    // regular vector) and after its last whole line take regular stores. Half types' vectors
    // are half a line, and a line streamed in part and stored in part (a plane's end streamed,
    // the next plane's head stored) is written out of the write-combining buffer as a partial
    // line: NCHW rows of 1568 bytes, 28x28 half planes, into a NumPy out= (16 bytes past a line)
    // have such a line at every plane boundary. AMD EPYC Zen 4, 64x256x28x28 bfloat16 and
    // float16 inference, in-process, 64 MB scrub, whole lines against vectors: 0.41-0.50x the
    // time at 1 and 2 threads. Prefetching 1 KB ahead on top of it (as map_positions does for
    // half types) was noise: 0.95-1.03x.
    const uintptr_t align = VL * sizeof(T);
    for (; i < n && (reinterpret_cast<uintptr_t>(o + i) & (align - 1)) != 0; ++i) map_one<R, true, T>(k, p, o, i);
    for (; i + VL <= n && (reinterpret_cast<uintptr_t>(o + i) & 63) != 0; i += VL)
      storev_unordered<T>(o + i, vec_at(i));
    for (; i + line_vectors<T> * VL <= n; i += line_vectors<T> * VL) {
      if constexpr (paired_stores<T>()) {
        storev2<T, true>(o + i, vec_at(i), vec_at(i + VL));
      } else {
        V r[line_vectors<T>];
        #pragma GCC unroll 2
        for (int q = 0; q < line_vectors<T>; ++q) r[q] = vec_at(i + q * VL);
        #pragma GCC unroll 2
        for (int q = 0; q < line_vectors<T>; ++q) storev_unordered<T, true>(o + i + q * VL, r[q]);
      }
    }
  }
  if constexpr (paired_stores<T>())
    for (; i + 2 * VL <= n; i += 2 * VL) storev2<T>(o + i, vec_at(i), vec_at(i + VL));
  for (; i + VL <= n; i += VL) storev_unordered<T>(o + i, vec_at(i));
  // A long tail goes through one partial vector; a short one is cheaper element by element,
  // but where the partial load and store are masked instructions (masked_partials). AMD EPYC
  // Zen 4, in cache, 1 thread, in-process, both orders, float32 NCHW: inference 16x128x14x14
  // (4-value tails) 0.94-0.96x the time, 8x64x10x10 0.94-0.96x, backward 8x64x10x10
  // 0.91-0.94x, 16x128x14x14 0.97x; float16 (masked stores of to_half_words) inference
  // 16x128x14x14 0.83-0.84x, 8x64x10x10 0.76-0.77x, training 0.90-0.93x, backward 0.94-0.97x;
  // bfloat16 1.00-1.02x slower (value by value: 1.05x), so it keeps the old rule but at the
  // avx512_bf16 level (see masked_partials).
  if (n - i >= (masked_partials<T>() ? 1 : VL / 2)) {
    map_partial<R, T>(p, o, i, n - i, kl);
  } else {
    for (; i < n; ++i) map_one<R, true, T>(k, p, o, i);
  }
}

// map_block over short contiguous rows (see ShortRow). The output may be an input, and the
// tail vector, which ends at the row's end, overlaps the last full one: so the tail is loaded
// and computed first, then each full vector is loaded, computed and stored, then the tail is
// stored, rewriting the values the full vector wrote with the same bits. (Loading every vector
// of the row into an array first made GCC 12 build float16 vectors lane by lane on the stack
// under AVX2.) Regular stores: a 7x7 row is too short to reach streaming stores' alignment.
template <class R, class T, int NV>
static inline __attribute__((always_inline)) void map_short_row(const T* const* p, T* o, int64_t len,
                                                                const acc_t<T>* k, const vec_t<acc_t<T>>* kl) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int VL = vlen<A>;
  constexpr int N = R::kIn;
  if (len < VL) {
    for (int64_t i = 0; i < len; ++i) map_one<R, true, T>(k, p, o, i);
    return;
  }
  const int64_t full = len / VL, tail = len - full * VL;
  // In the lane order storev_unordered puts back (the coefficients are splat; storev2's
  // levels keep loadv's order).
  auto vec_at = [&](int64_t at) {
    V v[N];
    #pragma GCC unroll 4
    for (int j = 0; j < N; ++j) v[j] = loadv_unordered(p[j] + at);
    return apply_vector_map<T>(R{}, kl, v);
  };
  // Computed whether or not it is stored (len >= VL: it lies inside the row): a vector
  // chosen between two values has to exist whole, on the stack under AVX2.
  const V last = vec_at(len - VL);
  if constexpr (paired_stores<T>()) {
#pragma GCC unroll 8
    for (int q = 0; q < NV; q += 2) {
      if (q + 1 < full) storev2<T>(o + q * VL, vec_at(q * VL), vec_at((q + 1) * VL));
      else if (q < full) storev_unordered<T>(o + q * VL, vec_at(q * VL));
    }
  } else {
#pragma GCC unroll 8
    for (int q = 0; q < NV; ++q)
      if (q < full) storev_unordered<T>(o + q * VL, vec_at(q * VL));
  }
  if (tail != 0) storev_unordered<T>(o + len - VL, last);
}

template <class R, class T, int NV>
void map_short_rows(const T* const* in, T* out, const Layout& L, int64_t begin, int64_t end, const acc_t<T>* k,
                    const vec_t<acc_t<T>>* kv) {
  using V = vec_t<acc_t<T>>;
  constexpr int N = R::kIn;
  V kl[coef_slots<R>];  // locals, as in map_contiguous
  #pragma GCC unroll 4
  for (int j = 0; j < R::kCoef; ++j) kl[j] = kv[j];
  for_each_segment<N + 1>(L, begin, end, [&](const int64_t* off, int64_t len) {
    const T* p[N];
    #pragma GCC unroll 4
    for (int j = 0; j < N; ++j) p[j] = in[j] + off[j];
    map_short_row<R, T, NV>(p, out + off[N], len, k, kl);
  });
}

// Channels-first: one channel (pointers at its first value), values [begin, end) of its walk;
// k: the channel's R::kCoef coefficients. Arrays in the layout: the inputs, then the output.
// Streamed stores (`nt`) are left unfenced: the caller fences once after its channels (see
// map_channels). `ahead`: prefetch every input's row kPrefetchRows rows ahead (contiguous rows
// of a walk over two reduced dims only).
template <class R, class T>
void map_block(const T* const* in, T* out, const Layout& L, int64_t begin, int64_t end, const acc_t<T>* k, bool nt,
               bool ahead = false) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int N = R::kIn;
  // The values that go one by one take the coefficients as 0 + k, the value splat gives the
  // vectors (a -0 coefficient is +0 there): which values go one by one depends on the ISA
  // level (masked_partials), the output's alignment and the plan's ranges (the thread count),
  // none of which may change their bits.
  A k0[coef_slots<R>];
  V kv[coef_slots<R>];
  #pragma GCC unroll 4
  for (int j = 0; j < R::kCoef; ++j) {
    k0[j] = A(0) + k[j];
    kv[j] = splat(k0[j]);
  }
  k = k0;
  bool unit = true;
  #pragma GCC unroll 4
  for (int t = 0; t <= N; ++t) unit = unit && L.inner_stride(t) == 1;
  if (unit && with_short_rows<A>(L, 0, [&](auto nv) {
        map_short_rows<R, T, decltype(nv)::value>(in, out, L, begin, end, k, kv);
      }))
    return;
  int64_t s[N];
  #pragma GCC unroll 4
  for (int j = 0; j < N; ++j) s[j] = L.inner_stride(j);
  const int64_t so = L.inner_stride(N);
  const bool prefetch = ahead && unit && L.nred == 2;
  for_each_segment<N + 1>(L, begin, end, [&](const int64_t* off, int64_t len) {
    const T* p[N];
    #pragma GCC unroll 4
    for (int j = 0; j < N; ++j) p[j] = in[j] + off[j];
    if (prefetch) {
      #pragma GCC unroll 4
      for (int j = 0; j < N; ++j)
        prefetch_span(p[j], kPrefetchRows * L.strides[j][0], len * static_cast<int64_t>(sizeof(T)));
    }
    T* o = out + off[N];
    if (unit) {
      map_contiguous<R, T>(k, kv, p, o, len, nt);
    } else {
      for (int64_t i = 0; i < len; ++i) map_one<R, false, T>(k, p, o, i, s, so);
    }
  });
}

// The first value of a vector in map_run's run at o: its vectors start on that value's phase
// (value index mod the vector length). Streamed, whole lines from the output's first line
// boundary; otherwise from the run's first value.
template <class T>
static inline int64_t run_vector_phase(const T* o, bool nt) {
  constexpr int64_t line = 64 / sizeof(T);
  if (!nt || reinterpret_cast<uintptr_t>(o) % sizeof(T) != 0) return 0;
  return (line - reinterpret_cast<uintptr_t>(o) / sizeof(T) % line) % line % vlen<acc_t<T>>;
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// half_lane_maps' vector in even-odd order (simd.h): the 16 bfloat16 values at p[j] mapped with
// the coefficients at k[j], 16 laid out as even_odd_order leaves them, stored to o (streamed
// when S).
template <class R, bool S>
static inline __attribute__((always_inline)) void put_even_odd(bfloat16* o, const bfloat16* const* p,
                                                               const float* const* k) {
  f32x8 kv[2][coef_slots<R>], v[2][R::kIn];
  #pragma GCC unroll 4
  for (int j = 0; j < R::kCoef; ++j) {
    kv[0][j] = load_half_lanes(k[j]);
    kv[1][j] = load_half_lanes(k[j] + 8);
  }
  #pragma GCC unroll 4
  for (int j = 0; j < R::kIn; ++j) load_even_odd(p[j], v[0][j], v[1][j]);
  store_even_odd<S>(o, apply_map(R{}, kv[0], v[0]), apply_map(R{}, kv[1], v[1]));
}
#endif

// A contiguous run of n values of every array whose value i takes coefficient j from e[j][i].
// Streamed (`nt`): the values before the output's first cache-line boundary and after its last
// one go one by one, whole lines between them in streaming vectors. Where half_lane_maps, `eo`
// (if given) holds the coefficients again with each 16 values from eo_phase (mod 16) on in
// even-odd order (EvenOddCoefficients): vectors on that phase then take the values as
// load_even_odd gives them.
template <class R, class T>
static inline __attribute__((always_inline)) void map_run(const T* const* p, T* o, int64_t n,
                                                          const acc_t<T>* const* e, bool nt,
                                                          const acc_t<T>* const* eo = nullptr,
                                                          int64_t eo_phase = -1) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int VL = vlen<A>;
  constexpr int N = R::kIn;
  auto one = [&](int64_t i) { map_one_at<R, T>(e, i, p, o, i); };
  auto vec_at = [&](int64_t i) {
    V kv[coef_slots<R>], v[N];
    #pragma GCC unroll 4
    for (int j = 0; j < R::kCoef; ++j) std::memcpy(&kv[j], e[j] + i, sizeof(V));
    #pragma GCC unroll 4
    for (int j = 0; j < N; ++j) v[j] = loadv(p[j] + i);
    return apply_vector_map<T>(R{}, kv, v);
  };
  // The run's loops with put(i, streamed) storing the vector at i (streamed when `streamed`
  // holds true).
  auto run = [&](auto put) __attribute__((always_inline)) {
    int64_t i = 0;
    // (An output whose address is not a multiple of the value size never reaches a line boundary.)
    if (nt && reinterpret_cast<uintptr_t>(o) % sizeof(T) == 0) {
      // Whole cache lines only: a line streamed in part (a half type's 32-byte vector, the rest
      // of the line written by regular stores) leaves the write-combining buffer as a partial
      // write: 256x2048x7x7 float16 inference, whose runs of 16 planes are 24.5 lines, took
      // 3x as long streamed by vectors as unstreamed.
      constexpr int64_t line = 64 / sizeof(T);
      const int64_t head = std::min<int64_t>(n, (line - reinterpret_cast<uintptr_t>(o) / sizeof(T) % line) % line);
      const int64_t lines_end = head + (n - head) / line * line;
      for (; i < head; ++i) one(i);
      if constexpr (paired_stores<T>()) {  // a line is two vectors (line_vectors)
        for (; i < lines_end; i += 2 * VL) storev2<T, true>(o + i, vec_at(i), vec_at(i + VL));
      } else {
        for (; i < lines_end; i += VL) put(i, std::true_type{});
      }
    }
    if constexpr (paired_stores<T>())
      for (; i + 2 * VL <= n; i += 2 * VL) storev2<T>(o + i, vec_at(i), vec_at(i + VL));
    for (; i + VL <= n; i += VL) put(i, std::false_type{});
    for (; i < n; ++i) one(i);
  };
#if defined(__AVX2__) && !defined(__AVX512F__)
  if constexpr (half_lane_maps<T>()) {
    // Per register: the even and odd values where the coefficients are laid out so, else
    // values 0-7 and 8-15.
    if (eo && run_vector_phase(o, nt) == eo_phase) {
      run([&](int64_t i, auto streamed) __attribute__((always_inline)) {
        const T* pi[N];
        const float* ki[coef_slots<R>];
        #pragma GCC unroll 4
        for (int j = 0; j < N; ++j) pi[j] = p[j] + i;
        #pragma GCC unroll 4
        for (int j = 0; j < R::kCoef; ++j) ki[j] = eo[j] + i;
        put_even_odd<R, decltype(streamed)::value>(o + i, pi, ki);
      });
    } else {
      run([&](int64_t i, auto streamed) __attribute__((always_inline)) {
        f32x8 r[2];
        #pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          f32x8 kv[coef_slots<R>], v[N];
          #pragma GCC unroll 4
          for (int j = 0; j < R::kCoef; ++j) kv[j] = load_half_lanes(e[j] + i + 8 * h);
          #pragma GCC unroll 4
          for (int j = 0; j < N; ++j) v[j] = load_half_lanes(p[j] + i + 8 * h);
          r[h] = apply_map(R{}, kv, v);
        }
        store_half_lanes<decltype(streamed)::value>(o + i, r[0], r[1]);
      });
    }
    return;
  }
#endif
  run([&](int64_t i, auto streamed) __attribute__((always_inline)) {
    storev<T, decltype(streamed)::value>(o + i, vec_at(i));
  });
}

// Runs shorter than this go row by row: a few lines per run, most of them shared with the
// neighbouring channels' runs that other tasks write (200000x2x49 float32 inference, one
// channel's 196-byte rows per task, took 17 ms as runs against 7.5 ms row by row).
constexpr int64_t kMinRunBytes = 1024;
// map_flat (every recipe: inference, training's map, the backward's dx) in ops of at least
// kTouchBytes (every array's bytes together) touches each of its arrays' pages
// kPageAheadBytes (two pages) ahead of the output (touch_pages). Smaller ops, within the reach
// of a core's second-level TLB (Zen 4: 3072 entries of 4 KB, 12 MB), do without: there the
// page loop and its touches cost 1-3% in cache. AMD EPYC Zen 4, float32, in-process, both
// orders, against none, over three runs: inference from memory (64 MB scrub) on 4 KB pages
// 4096x1024 0.87-0.91x the time (2 threads), 0.81-0.89x (1), 65536x64 0.89-0.98x, hot
// 4096x1024 0.83-0.89x (2), 0.76-0.82x (1); on huge pages 4096x1024 0.86-1.03x, 65536x64
// 0.96-1.02x; 65536x64 training 1.00-1.02x, backward 0.95-0.96x (huge pages 0.98-1.00x);
// training and backward of narrow NHWC rows on huge pages with NumPy's 16-byte offset
// (8x32x112x112, 32x64x56x56) 0.87-1.04x.
constexpr int64_t kPageAheadBytes = 2 * kPageBytes;
constexpr int64_t kTouchBytes = int64_t(8) << 20;

// Bytes of each run that map_run_streams takes in turn.
constexpr int64_t kRunPieceBytes = 512;

// Room for the values of a streamed run's coefficients (stream_run_channels' planes of at most
// NV vectors).
template <class T, int NV>
constexpr int64_t stream_run_values = std::max<int64_t>(kBlockChannels * NV * vlen<acc_t<T>>,
                                                        2 * kStreamRunBytes / static_cast<int64_t>(sizeof(T)));

// The coefficients of a block of m channels repeated over each channel's plane, ext[j][i] for
// value i of a run of whole planes (map_run_block, map_run_streams), e[j] pointing at ext[j];
// room for Values values (m * plane at most).
template <class R, class A, int64_t Values>
struct RunCoefficients {
  A ext[coef_slots<R>][Values];
  const A* e[coef_slots<R>];
  RunCoefficients(const A* const* k, int64_t m, int64_t plane) {
    // As 0 + k, the value splat gives the rows' vectors (a -0 mean or shift is +0 there).
    for (int j = 0; j < R::kCoef; ++j) {
      for (int64_t i = 0; i < m; ++i) std::fill(ext[j] + i * plane, ext[j] + (i + 1) * plane, A(0) + k[j][i]);
      e[j] = ext[j];
    }
  }
};

struct NoEvenOdd {};
#if defined(__AVX2__) && !defined(__AVX512F__)
// RunCoefficients' values again, each 16 from `phase` on (the vectors' first values in a
// run whose vectors start on that phase, run_vector_phase) in the order load_even_odd gives
// them: the 8 even ones, then the 8 odd ones (for half_lane_maps' map_run: bfloat16 under
// AVX2, where the even-odd order spares a vector two shifts and two shuffles; simd.h). Built
// on the first row's phase, 16 values by shuffles (value by value, the build took a sixth of
// an in-cache 16x2048x7x7 inference, which ran 1.09-1.17x the time of the ordered values'); a
// row on another phase (rows whose stride is not a multiple of 32 bytes, streamed) takes the
// values in order. AMD EPYC Zen 3, in-process, both orders, against 395ef84 (loadv's vectors):
// in cache, 1 thread, 16x2048x7x7 inference 0.91-0.95x the time (2 threads 0.87-0.88x),
// training 0.95-0.96x, backward 0.93-0.96x, with residual and ReLU 0.89-0.91x; 32x512x6x6
// inference 0.76-0.77x; 256x2048x7x7 from memory (64 MB scrub), 1 thread, inference
// 0.93-0.94x, training 0.92-0.95x, backward 0.89-0.97x, 2 threads 0.92-0.95x.
template <class R, int64_t Values>
struct EvenOddCoefficients {
  float ext[coef_slots<R>][Values];
  const float* e[coef_slots<R>];
  int64_t phase = -1;
  void build(const float* const* ordered, int64_t n, int64_t phase_) {
    phase = phase_;
    for (int j = 0; j < R::kCoef; ++j) {
      const float* src = ordered[j];
      const int64_t g = std::min(phase, n);
      std::copy(src, src + g, ext[j]);
      even_odd_copy(src + g, ext[j] + g, n - g);
      e[j] = ext[j];
    }
  }
};
template <class R, int64_t Values>
using EvenOddFor = EvenOddCoefficients<R, Values>;
#else
template <class R, int64_t Values>
using EvenOddFor = NoEvenOdd;
#endif

// A block of m channels of map_channels (pointers and coefficients at its first channel),
// whole short planes back to back: each row of one outer index is one run of m * plane
// values, each coefficient repeated over its channel's plane (built once per block, reused by
// every row). Vectors span plane boundaries: a 7x7 plane's 49 values cost 3 1/16 vectors
// rather than 3 and an overlapping tail, none split across cache lines, and streamed outputs
// skip the read-for-ownership the rows' regular stores paid (256x2048x7x7 float32 inference on
// the Xeon, 2 threads: 8.7-9.3 -> 5.0-5.3 ms, training 12.8-13.7 -> 8.0-8.7, backward
// 22.3-23.8 -> 17.9-19.1). The next rows' inputs are prefetched as row by row; the output is
// not (a line fetched for writing and then streamed over is written back first, which
// doubled the time).
template <class R, class T, int NV>
__attribute__((noinline)) void map_run_block(const T* const* in, T* out, const Layout& L, int64_t m, int64_t begin,
                                             int64_t end, const acc_t<T>* const* k, bool nt) {
  constexpr int N = R::kIn;
  const int64_t plane = L.inner();
  constexpr int64_t kValues = kBlockChannels * NV * vlen<acc_t<T>>;
  const RunCoefficients<R, acc_t<T>, kValues> rc(k, m, plane);
  std::conditional_t<half_lane_maps<T>(), EvenOddFor<R, kValues>, NoEvenOdd> eo;
  for_each_segment<N + 1>(L, begin, end, [&](const int64_t* off, int64_t len) __attribute__((always_inline)) {
    const T* p[N];
    #pragma GCC unroll 4
    for (int j = 0; j < N; ++j) {
      p[j] = in[j] + off[j];
      if (nt && L.nred == 2) prefetch_span(p[j], kPrefetchRows * L.strides[j][0], m * plane * static_cast<int64_t>(sizeof(T)));
    }
    if constexpr (half_lane_maps<T>()) {
      // (len is the plane: the caller takes runs of whole planes.)
      if (eo.phase < 0) eo.build(rc.e, m * len, run_vector_phase(out + off[N], nt));
      map_run<R, T>(p, out + off[N], m * len, rc.e, nt, eo.e, eo.phase);
    } else {
      map_run<R, T>(p, out + off[N], m * len, rc.e, nt);
    }
  });
}

// map_run_block for inputs that come from memory (`cold`: a pass of its own) and streamed
// outputs: kStreamRows runs at a time, kRunPieceBytes of each in turn, so the prefetchers
// follow kStreamRows streams (see kStreamRows); no lines fetched ahead, the next tile's pages
// touched (below). Pieces end on cache lines of the first run's output, so streamed pieces are
// whole lines (every run's, when the rows lie whole lines apart). AMD EPYC Zen 4, 256x2048x7x7 inference, in-process A/B against
// map_run_block: float32 2 threads 9.4 -> 7.9 ms, 1 thread 17.9 -> 13.1 ms; float16 1 thread
// 8.7 -> 7.6 ms; bfloat16 unchanged (its rounding store dominates); pieces of 256 and 1024
// bytes were slower in float32. After a reduction the inputs are in
// cache, and pieces there made training 8-15% slower: those passes keep map_run_block.
// (Written into map_run_block, this walk made that one 9-15% slower too.)
template <class R, class T, int NV>
__attribute__((noinline)) void map_run_streams(const T* const* in, T* out, const Layout& L, int64_t m, int64_t begin,
                                               int64_t end, const acc_t<T>* const* k) {
  using A = acc_t<T>;
  constexpr int N = R::kIn;
  const RunCoefficients<R, A, stream_run_values<T, NV>> rc(k, m, L.inner());
  constexpr int64_t piece = kRunPieceBytes / static_cast<int64_t>(sizeof(T));
  for_row_tiles<N + 1>(L, begin, end, [&](const int64_t (*offs)[N + 1], const int64_t* lens, int rows) {
    const int64_t n = m * lens[0];  // whole planes: runs start and end on planes
    // The next tile's runs (kStreamRows rows on), a prefetch per 4 KB page of each (see
    // touch_pages): this tile's 8 runs are 8 pages or more, each a TLB miss on 4 KB pages. AMD
    // EPYC Zen 4, 256x2048x7x7 inference, in-process, 64 MB scrub, both orders, against none,
    // over four runs: on 4 KB pages float32 0.85-0.90x the time (2 threads), 0.84-0.90x (1),
    // bfloat16 0.93-0.99x; on huge pages 0.96-1.02x. (The same for the statistics' and the
    // backward's short-row tiles measured 0.94-1.02x on 4 KB pages: left out.)
    if (L.nred == 2)
      for (int r = 0; r < rows; ++r) {
        #pragma GCC unroll 4
        for (int j = 0; j < N; ++j) touch_pages(in[j] + offs[r][j], kStreamRows * L.strides[j][0], n);
        touch_pages(out + offs[r][N], kStreamRows * L.strides[N][0], n);
      }
    const int64_t lead = (64 - reinterpret_cast<uintptr_t>(out + offs[0][N]) % 64) % 64 / sizeof(T);
    for (int64_t a = 0, b = lead > 0 ? std::min(n, lead) : std::min(n, piece); a < n;
         a = b, b = std::min(n, b + piece))
      for (int r = 0; r < rows; ++r) {
        const T* p[N];
        #pragma GCC unroll 4
        for (int j = 0; j < N; ++j) p[j] = in[j] + offs[r][j] + a;
        const A* ea[coef_slots<R>];
        #pragma GCC unroll 4
        for (int j = 0; j < R::kCoef; ++j) ea[j] = rc.e[j] + a;
        map_run<R, T>(p, out + offs[r][N] + a, b - a, ea, true);
      }
  });
}

// A block of m channels of map_channels (pointers and coefficients at its first channel),
// short rows row by row, the block's channels back to back.
template <class R, class T, int NV>
static inline __attribute__((always_inline)) void map_row_block(const T* const* in, T* out, const Layout& L, int64_t m,
                                                                int64_t begin, int64_t end, const acc_t<T>* const* k,
                                                                bool nt) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int N = R::kIn;
  A kc[kBlockChannels][coef_slots<R>];
  V kv[kBlockChannels][coef_slots<R>];
  for (int64_t i = 0; i < m; ++i) {
    #pragma GCC unroll 4
    for (int j = 0; j < R::kCoef; ++j) {
      kc[i][j] = A(0) + k[j][i];  // as splat gives the vectors (see map_block)
      kv[i][j] = splat(kc[i][j]);
    }
  }
  for_each_segment<N + 1>(L, begin, end, [&](const int64_t* off, int64_t len) __attribute__((always_inline)) {
    // Every array's rows of the block a few rows ahead, as the reductions do (see
    // moments_short_rows_channels): runs of 16 planes, far apart, that the hardware
    // prefetchers do not follow in time.
    if (nt && L.nred == 2) {
      #pragma GCC unroll 4
      for (int j = 0; j < N; ++j)
        prefetch_span(in[j] + off[j], kPrefetchRows * L.strides[j][0],
                      ((m - 1) * L.channel_stride[j] + len) * static_cast<int64_t>(sizeof(T)));
      prefetch_span_for_write(out + off[N], kPrefetchRows * L.strides[N][0],
                              ((m - 1) * L.channel_stride[N] + len) * static_cast<int64_t>(sizeof(T)));
    }
    for (int64_t i = 0; i < m; ++i) {
      const T* p[N];
      #pragma GCC unroll 4
      for (int j = 0; j < N; ++j) p[j] = in[j] + i * L.channel_stride[j] + off[j];
      map_short_row<R, T, NV>(p, out + i * L.channel_stride[N] + off[N], len, kc[i], kv[i]);
    }
  });
}

// map_block over nc channels: channel i's arrays at in[j] + i * L.channel_stride[j] and
// out + i * L.channel_stride[N], its coefficients at k[j][i]. Short rows go in blocks of
// channels, a row of the block's channels after the other: memory order for NCHW's small
// planes, in one call, where a call per channel and row (256x2048x7x7: half a million) cost
// more than the rows' work. Other rows go channel by channel.
template <class R, class T>
void map_channels(const T* const* in, T* out, const Layout& L, int64_t nc, int64_t begin, int64_t end,
                  const acc_t<T>* const* k, bool nt, bool cold) {
  using A = acc_t<T>;
  constexpr int N = R::kIn;
  bool unit = true;
  #pragma GCC unroll 4
  for (int t = 0; t <= N; ++t) unit = unit && L.inner_stride(t) == 1;
  // Whole planes back to back go as runs (map_run_block) when streamed. In cache only under
  // AVX-512 and not for float16, and for bfloat16 under AVX2 (below): elsewhere the runs'
  // coefficient loads cost more than the rows' tail vectors. Xeon, 2 threads, 8x512x7x7
  // inference as runs: AVX-512 float16 17.6 -> 19.3 us, float32 22.0 -> 21.5, bfloat16 30 ->
  // 26 (64x2048x7x7 bfloat16 865-891 -> 676-716 us,
  // float32 1020-1090 -> 949-993); AVX2 float32 26 -> 28-32 us. And in cache only for calls of
  // more than one row: a block's coefficients are spread over its planes once per call (three
  // 16 x 49 arrays for 7x7 float32), which one row of the memory-order walk (walks_memory_order,
  // a call per outer index) does not repay: 32x2048x7x7 float32 inference on an AMD EPYC Zen 4
  // (AVX-512), 2 threads, hot: 1.27-1.51 ms in memory order as runs, 0.82-0.91 ms in blocks.
  // Nor, in cache, planes of two or more whole vectors, which the rows take without a tail
  // vector, their coefficients splat in registers where a run loads a vector of each per
  // vector: AMD EPYC Zen 4, 1 thread, in-process, both orders, rows against runs: float32
  // 8x128x8x8 inference 0.75-0.78x the time, training 0.91x, backward 0.88x (2 threads 0.94x),
  // 8x256x6x8 inference 0.77-0.81x, backward 0.94x, 8x256x4x8 (two vectors) 0.96x / level;
  // bfloat16 8x128x8x8 inference 0.89x, backward 0.95x. A plane of one vector (4x4 float32)
  // stays a run: rows of one vector took 1.16-1.26x the time. Under AVX2 bfloat16 takes them
  // too: its computed rounding per vector outweighs the coefficient loads. AMD EPYC Zen 3, in
  // cache, in-process, both orders, runs against rows: 16x2048x7x7 inference 0.88-0.91x the
  // time (1 thread), 0.99x (2), training 0.96-0.97x (1), 0.98x (2), backward level;
  // 32x512x6x6 inference 0.87-0.93x, training 0.95x; from memory level. (A block of 16 5x5 or
  // 4x4 bfloat16 planes is under kMinRunBytes: rows, as before.)
#if defined(__AVX512F__)
  constexpr bool cached_runs = !std::is_same_v<T, float16>;
#elif defined(__AVX2__)
  constexpr bool cached_runs = std::is_same_v<T, bfloat16>;
#else
  constexpr bool cached_runs = false;
#endif
  // map_run_streams' pieces (passes of their own) except bfloat16 under AVX2, whose computed
  // rounding store makes the pass's rows compute-bound: AMD EPYC Zen 3 (AVX2), 256x2048x7x7
  // NCHW inference, 2 threads, in-process, 64 MB scrub, map_run_block against the pieces:
  // bfloat16 0.83-0.88x the time (host slow), 0.93-1.01x (host fast); backward 0.98-1.02x.
  // Float32 and float16 there lose without the pieces (1.16-1.19x, 1.03x).
#if defined(__AVX2__) && !defined(__AVX512F__)
  constexpr bool piece_streams = !std::is_same_v<T, bfloat16>;
#else
  constexpr bool piece_streams = true;
#endif
  const int64_t plane = L.inner();
  const bool whole_vectors = plane % vlen<A> == 0 && plane > vlen<A>;
  const bool runs = (nt || (cached_runs && end - begin > plane && !whole_vectors)) && begin % plane == 0 &&
                    end % plane == 0 && planes_back_to_back(L, N + 1);
  if (unit && with_short_rows<A>(L, 0, [&](auto nv) {
        constexpr int NV = decltype(nv)::value;
        bool streamed = false;
        const bool streams = runs && piece_streams && cold && nt;
        // Streamed runs take stream_run_channels' channels; rows (map_row_block), kBlockChannels.
        const int64_t plane_bytes = plane * static_cast<int64_t>(sizeof(T));
        const int64_t wide = streams ? stream_run_channels(plane_bytes) : kBlockChannels;
        for (int64_t i0 = 0, m = 0; i0 < nc; i0 += m) {
          m = std::min<int64_t>(wide, nc - i0);
          if (!(runs && m * plane_bytes >= kMinRunBytes)) m = std::min<int64_t>(kBlockChannels, m);
          const T* ib[N];
          #pragma GCC unroll 4
          for (int j = 0; j < N; ++j) ib[j] = in[j] + i0 * L.channel_stride[j];
          T* ob = out + i0 * L.channel_stride[N];
          const A* kb[coef_slots<R>] = {};
          #pragma GCC unroll 4
          for (int j = 0; j < R::kCoef; ++j) kb[j] = k[j] + i0;
          if (runs && m * plane_bytes >= kMinRunBytes) {
            if (streams) map_run_streams<R, T, NV>(ib, ob, L, m, begin, end, kb);
            else map_run_block<R, T, NV>(ib, ob, L, m, begin, end, kb, nt);
            streamed = nt;
          } else {
            map_row_block<R, T, NV>(ib, ob, L, m, begin, end, kb, nt);
          }
        }
        if (streamed) store_fence();
      }))
    return;
  // The forward's rows under kMapRowPrefetchBytes from memory, a channel at a time, are a few
  // lines per page (a channel's rows are C rows apart), where the hardware prefetchers do not
  // follow: their inputs are fetched kPrefetchRows rows ahead. AMD EPYC Zen 4, inference (NCHW
  // rows under 512 bytes walk in channel blocks; see kMemoryOrderStreamedRowBytes), 2 threads,
  // in-process, 64 MB scrub, both orders: 256x512x10x10 float32 0.63-0.65x the time, bfloat16
  // 0.68-0.70x, 256x256x9x9 float32 0.61-0.65x (2 rows ahead 0.68-0.71x, 8 rows 0.62-0.77x);
  // training 0.99-1.01x. The backward's dx slowed with it (10x10 float32 1.08-1.11x, bfloat16
  // 1.14-1.18x), as longer rows did (28x28, 56x56: 1.04-1.08x): they do without.
  constexpr bool forward = kForwardMap<R>;
  const bool ahead = forward && cold && nt && L.inner() * static_cast<int64_t>(sizeof(T)) < kMapRowPrefetchBytes;
  for (int64_t i = 0; i < nc; ++i) {
    const T* p[N];
    #pragma GCC unroll 4
    for (int j = 0; j < N; ++j) p[j] = in[j] + i * L.channel_stride[j];
    A kc[coef_slots<R>];
    #pragma GCC unroll 4
    for (int j = 0; j < R::kCoef; ++j) kc[j] = k[j][i];
    map_block<R, T>(p, out + i * L.channel_stride[N], L, begin, end, kc, nt, ahead);
  }
  // One fence for the call's channels: a fence per channel held each plane's streamed stores
  // up until they had drained. AMD EPYC Zen 4, 64x256x28x28 NCHW inference (a call per outer
  // index, 256 planes of 3 KB float32), in-process, 64 MB scrub, one fence against one per
  // channel: float32 0.55x the time at 1 thread, 0.78-0.88x at 2; bfloat16 and float16 with
  // whole lines streamed (map_contiguous) 0.66-0.72x at 2. Training and backward, whose calls
  // cover larger ranges: 0.98-1.06x, noise.
  if (nt) store_fence();
}

// Channels-last positions [p0, p1) that lie back to back in every array (rows exactly C
// apart, C a multiple of the vector length), as one flat run: the values before the first
// aligned address of the output one by one, then vectors (streamed when `stream`), whose
// channels are (i mod C) ... (i mod C) + VL - 1, read from the coefficients rotated to the
// first vector's channel. Any output alignment streams (65536x64 float32 inference into a
// NumPy out=, 16 bytes off, Xeon, 2 threads: 1.3 ms with regular stores, 0.6 ms streamed), and
// narrow rows lose the per-position loop. Returns false, having done nothing, when the arrays
// are not so laid out. Streamed: rows narrower than kPeelRowBytes, or than kFlatRowBytes when
// the output is misaligned; in cache: rows of any width where a vector is one 64-byte
// register, of at most kHotFlatVectors vectors elsewhere (map_positions).
template <class R, class T>
bool map_flat(const T* const* in, T* out, const Layout& L, int64_t p0, int64_t p1, const acc_t<T>* const* k,
              bool stream) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int VL = vlen<A>;
  constexpr int N = R::kIn;
  const int64_t C = L.channels;
  // The coefficients' period in the flat run: lcm(C, VL), C itself when C is a whole number of
  // vectors (else 48 for 24 float channels), up to kFlatPatternVectors vectors.
  const int64_t P = std::lcm(C, static_cast<int64_t>(VL));
  if (L.nred != 1 || (P != C && P > kFlatPatternVectors * VL) ||
      reinterpret_cast<uintptr_t>(out) % sizeof(T) != 0)
    return false;
  for (int t = 0; t <= N; ++t)
    if (L.strides[t][0] != C) return false;
  const int64_t i0 = p0 * C, i1 = p1 * C;
  const int64_t align = VL * sizeof(T);
  const int64_t head = std::min(i1 - i0, elements_to_boundary(out + i0, align));
  // The coefficients rotated to the first vector's channel c0 and placed on a vector boundary:
  // the vectors' channels then start at c0 + a multiple of VL (the period P is one), so every
  // coefficient load is aligned. Unrotated (extended by VL past C, read at the channel phase),
  // an output 16 bytes past a line made each of them straddle lines: AMD EPYC Zen 4, streamed float32
  // inference into such an out=, 2 threads, 64 MB scrub, tools/ab_lib both orders, rotated
  // against unrotated: 65536x64 0.79-0.85x the time (AVX2 0.80-0.82x), 32768x128 0.89-0.91x
  // (AVX2 0.93-0.95x), 16384x256 0.83-0.88x.
  const int64_t c0 = (i0 + head) % C;
  constexpr int64_t kv_bytes = VL * sizeof(A);
  buffer<A> ext(static_cast<size_t>((half_lane_maps<T>() ? 2 : 1) * coef_slots<R> * P + VL));
  A* const e = ext.data() + elements_to_boundary(ext.data(), kv_bytes);
  for (int j = 0; j < R::kCoef; ++j)  // by copies: a modulo per value cost ~0.5 us a call at C = 64
    for (int64_t at = 0, c = c0; at < P; c = 0) {
      const int64_t len = std::min(C - c, P - at);
      std::memcpy(e + j * P + at, k[j] + c, static_cast<size_t>(len) * sizeof(A));
      at += len;
    }
#if defined(__AVX2__) && !defined(__AVX512F__)
  // half_lane_maps: the pattern again in even-odd order (every vector starts on a multiple of
  // VL into it), read by put_even_odd.
  A* eo = nullptr;
  if constexpr (half_lane_maps<T>()) {
    eo = e + coef_slots<R> * P;
    for (int j = 0; j < R::kCoef; ++j) even_odd_copy(e + j * P, eo + j * P, P);
  }
#endif
  auto one = [&](int64_t i) { map_one_at<R, T>(k, i % C, in, out, i); };
  int64_t i = i0;
  for (; i < i0 + head; ++i) one(i);
  int64_t m = 0;  // the vector's first channel is (c0 + m) % C
  // Ops of kTouchBytes or more go page by page of the output (out + i is on a vector boundary,
  // and so are its pages), each page's start touching every array's page kPageAheadBytes on
  // (touch_pages); smaller ones in one go. (The op's size, not the call's: a call is one task's
  // group of positions, 128 KB of each array for 4096x1024.)
  const bool touch = (N + 1) * L.count * C * static_cast<int64_t>(sizeof(T)) >= kTouchBytes;
  constexpr int64_t ahead = kPageAheadBytes / static_cast<int64_t>(sizeof(T));
  while (i + VL <= i1) {
    int64_t stop = i1;
    if (touch) {
      #pragma GCC unroll 4
      for (int j = 0; j < N; ++j) touch_pages(in[j] + i, ahead, 1);
      touch_pages(out + i, ahead, 1);
      // A multiple of VL (out + i is on a vector boundary); the page after too when not, so
      // that each chunk holds a vector.
      const int64_t to_page = elements_to_boundary(out + i, kPageBytes);
      stop = std::min(i1, i + (to_page >= VL ? to_page : to_page + kPageBytes / static_cast<int64_t>(sizeof(T))));
    }
    // The vector at i, its coefficients from channel phase m, which then steps on a vector.
    auto vec_next = [&](int64_t at) {
      V kv[coef_slots<R>], v[N];
      #pragma GCC unroll 4
      for (int j = 0; j < R::kCoef; ++j) std::memcpy(&kv[j], e + j * P + m, sizeof(V));
      #pragma GCC unroll 4
      for (int j = 0; j < N; ++j) v[j] = loadv(in[j] + at);
      m += VL;
      if (m >= P) m -= P;
      return apply_vector_map<T>(R{}, kv, v);
    };
#if defined(__AVX2__) && !defined(__AVX512F__)
    if constexpr (half_lane_maps<T>()) {
      for (; i + VL <= stop; i += VL) {
        const T* pi[N];
        const A* ki[coef_slots<R>];
        #pragma GCC unroll 4
        for (int j = 0; j < N; ++j) pi[j] = in[j] + i;
        #pragma GCC unroll 4
        for (int j = 0; j < R::kCoef; ++j) ki[j] = eo + j * P + m;
        m += VL;
        if (m >= P) m -= P;
        if (stream) put_even_odd<R, true>(out + i, pi, ki);
        else put_even_odd<R, false>(out + i, pi, ki);
      }
      continue;
    }
#endif
    if constexpr (paired_stores<T>())
      for (; i + 2 * VL <= stop; i += 2 * VL) {
        const V r0 = vec_next(i);
        const V r1 = vec_next(i + VL);
        if (stream) storev2<T, true>(out + i, r0, r1);
        else storev2<T>(out + i, r0, r1);
      }
    for (; i + VL <= stop; i += VL) {
      const V r = vec_next(i);
      if (stream) storev<T, true>(out + i, r);
      else storev<T>(out + i, r);
    }
  }
  for (; i < i1; ++i) one(i);
  if (stream) store_fence();
  return true;
}

// Channels-last: every channel of positions [p0, p1); k[j] points at the (C,) values of
// coefficient j.
template <class R, class T>
void map_positions(const T* const* in, T* out, const Layout& L, int64_t p0, int64_t p1, const acc_t<T>* const* k,
                   bool nt) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int VL = vlen<A>;
  constexpr int N = R::kIn;
  const int64_t C = L.channels;
  constexpr int64_t align = VL * sizeof(T);
  // Streaming stores need the vectors' addresses aligned. Positions that all start aligned
  // stream from channel 0. Positions that share one misalignment (an out= from malloc, 16
  // bytes past a 64-byte boundary, with position strides that are multiples of 64 bytes)
  // stream from the first aligned channel, the channels before it one by one: worth it for
  // rows of at least kPeelRowBytes (kFlatRowBytes when the positions lie back to back: see
  // below; 4096x1024 float32 inference on the Xeon into a NumPy out=: 1.34 -> 0.6 ms at 2
  // threads). The same values either way: scalar and vector paths apply the same formula.
  // Narrow rows as one flat run; wide ones per position, peeled when misaligned (flat, 4096x1024
  // float32 inference ran at 1.0-1.1 ms against 0.67 ms peeled). Rows of 1-2 KB go flat when
  // misaligned: peeled, each position's head and tail (16 of 256 float32 channels) cost as
  // much as its vectors. AMD EPYC Zen 4, into a NumPy out= (16 bytes past a line), data from
  // memory, flat against peeled: 64x28x28x256 float32 inference 0.84-0.94x the time, training
  // 0.96x, backward 0.80x, backward_elemt 0.72x; 16384x384 inference 0.83x (2 threads), 1.03x
  // (1); 32768x512 bfloat16 inference 0.76x, backward 0.90x, training 0.82x (1 thread). Rows of
  // 2 KB were mixed (16384x512 float32 0.90-1.01x, 32x28x28x512 backward 1.08-1.22x), rows of 4
  // KB slower (8192x1024 inference 1.07-1.29x): they stay peeled. Aligned 1 KB rows stay per
  // position too (flat 1.02-1.14x the time, 64x28x28x256). Masked vectors for the head and tail
  // instead of values one by one were slower still (1.2-1.8x at 1 KB).
  const int64_t row_bytes = C * static_cast<int64_t>(sizeof(T));
  bool stream = nt && positions_aligned(L, N, out, align);
  // Streamed, rows narrower than kPeelRowBytes (kFlatRowBytes when misaligned; above) go flat.
  // In cache, rows back to back go flat too, with regular stores: one head for the call
  // instead of a loop per position, whose overhead per row costs more than a narrow row's
  // vectors, and whose vectors, when the output is misaligned, straddle lines. Flat runs win
  // at any row width where a vector is one 64-byte register (AVX-512, float32 and float64),
  // and on rows of up to kHotFlatVectors vectors (of VL lanes: 128 float, 64 double channels)
  // elsewhere: AVX2, whose vectors are two registers, and half types, whose stores are 32
  // bytes. AMD EPYC Zen 4, hot, tools/ab_lib both orders, inference, 1 thread unless stated,
  // flat against per position. x and out 16 bytes past a line (NumPy's): AVX-512 float32
  // 8192x64 0.55-0.61x the time (2 threads 0.60-0.61x), 4096x128 0.75-0.76x, 1024x512
  // 0.65-0.67x, 128x4096 0.80-0.84x, 64x8192 level; AVX2 float32 8192x64 0.71-0.73x (2
  // threads 0.63-0.65x), 4096x128 0.82-0.94x, 2048x256 mixed (0.82-1.04x); float16 8192x64
  // 0.54-0.60x, 4096x128 0.77-0.78x; bfloat16 8192x128 0.94x, 4096x256 1.00-1.10x; training
  // 2048x256 0.90x. Aligned: float32 8192x64 0.59-0.62x (AVX2 0.72-0.77x, training
  // 0.81-0.83x), 4096x128 0.78-0.82x, 2048x256 0.92-1.00x, 1024x512 0.69-0.71x, 128x4096 and
  // 64x8192 0.90-0.93x; bfloat16 8192x64 0.74-0.78x. Streamed outputs keep their own rule
  // above: there rows of 4-8 KB were slower flat (1.07-1.14x) and 1 KB rows level.
#if defined(__AVX512F__)
  constexpr bool one_register = sizeof(T) >= 4;
#else
  constexpr bool one_register = false;
#endif
  const bool flat = nt ? row_bytes < (stream ? kPeelRowBytes : kFlatRowBytes) : one_register || C <= kHotFlatVectors * VL;
  if (flat && map_flat<R, T>(in, out, L, p0, p1, k, nt)) return;
  int64_t head = 0;
  if (nt && !stream && row_bytes >= kPeelRowBytes &&
      reinterpret_cast<uintptr_t>(out) % sizeof(T) == 0) {
    const T* aligned_base = out + elements_to_boundary(out, align);
    if (positions_aligned(L, N, aligned_base, align)) {
      stream = true;
      head = aligned_base - out;
    }
  }
  const int64_t Cv = head + (C - head) / VL * VL;
  const A* kp[coef_slots<R>];
#pragma GCC unroll 4
  for (int j = 0; j < R::kCoef; ++j) kp[j] = k[j];
#if defined(__AVX2__) && !defined(__AVX512F__)
  // half_lane_maps: the coefficients of channels [head, Cv) again in even-odd order, read by
  // put_even_odd (every position's vectors start on channel head). AMD EPYC Zen 3, in-process,
  // both orders, against loadv's order: inference 16x7x7x2048 in cache, 1 thread, 0.81-0.82x
  // the time, training 0.89-0.92x, backward 0.96x; 2048x1024 0.80-0.81x; 256x7x7x2048 from
  // memory (64 MB scrub) 0.82-0.85x (1 thread), 0.86-0.88x (2), training 0.91-0.95x, backward
  // 0.87-0.94x. Flat runs (map_flat, 64 channels) 0.95-0.97x in cache, level from memory;
  // tiny ops at 2 threads (1024x64, 8 us) 1.03x.
  scratch_array<A> eo_ext;  // (written where read; none for other types)
  const A* eo[coef_slots<R>] = {};
  if constexpr (half_lane_maps<T>()) {
    eo_ext = scratch_array<A>(static_cast<size_t>(coef_slots<R> * C));
    for (int j = 0; j < R::kCoef; ++j) {
      even_odd_copy(k[j] + head, eo_ext.data() + j * C + head, Cv - head);
      eo[j] = eo_ext.data() + j * C;
    }
  }
#endif
  auto one = [&](const T* const* p, T* o, int64_t c) { map_one_at<R, T>(kp, c, p, o, c); };
  // Half types' inputs from memory are read kMapPrefetchBytes ahead as each vector is: a
  // position's row begins a new page (4 KB rows of 2048 half channels) or soon crosses one,
  // where the hardware prefetchers stop, and each row then began with a miss. AMD EPYC Zen 4,
  // 2 threads, in-process, 64 MB scrub, against none: inference 256x7x7x2048 bfloat16
  // 0.84-0.99x the time, float16 0.83x, 16384x1024 bfloat16 0.83-0.91x, 32768x2048 0.83x;
  // training 256x7x7x2048 bfloat16 0.87x, float16 0.93x, 16384x1024 0.98x; backward
  // 256x7x7x2048 bfloat16 0.96x, 16384x1024 0.97x; 1 thread 0.82-0.86x. Float32 was mixed
  // (inference 0.89-1.14x, backward 256x7x7x2048 1.08x, 16384x2048 training 1.04x): it does
  // without. 256 bytes ahead helped less, 2 KB about as much.
  const int64_t ahead = sizeof(T) == 2 && nt ? kMapPrefetchBytes / static_cast<int64_t>(sizeof(T)) : 0;
  Odometer<N + 1> pos(L, L.nred, p0);
  for (int64_t q = p0; q < p1; ++q, pos.next()) {
    const T* p[N];
    #pragma GCC unroll 4
    for (int j = 0; j < N; ++j) p[j] = in[j] + pos.off[j];
    T* o = out + pos.off[N];
    for (int64_t c = 0; c < head; ++c) one(p, o, c);
    auto vec_at = [&](int64_t c) {
      V kv[coef_slots<R>], v[N];
      #pragma GCC unroll 4
      for (int j = 0; j < R::kCoef; ++j) std::memcpy(&kv[j], kp[j] + c, sizeof(V));
      #pragma GCC unroll 4
      for (int j = 0; j < N; ++j) v[j] = loadv(p[j] + c);
      if (ahead) {
        #pragma GCC unroll 4
        for (int j = 0; j < N; ++j) prefetch_at(p[j] + c, ahead);
      }
      return apply_vector_map<T>(R{}, kv, v);
    };
    int64_t c = head;
#if defined(__AVX2__) && !defined(__AVX512F__)
    if constexpr (half_lane_maps<T>())
      for (; c < Cv; c += VL) {
        const T* pc[N];
        const A* kc[coef_slots<R>];
        #pragma GCC unroll 4
        for (int j = 0; j < N; ++j) {
          pc[j] = p[j] + c;
          if (ahead) prefetch_at(pc[j], ahead);
        }
        #pragma GCC unroll 4
        for (int j = 0; j < R::kCoef; ++j) kc[j] = eo[j] + c;
        if (stream) put_even_odd<R, true>(o + c, pc, kc);
        else put_even_odd<R, false>(o + c, pc, kc);
      }
#endif
    if constexpr (paired_stores<T>())
      for (; c + 2 * VL <= Cv; c += 2 * VL) {
        const V r0 = vec_at(c);
        const V r1 = vec_at(c + VL);
        if (stream) storev2<T, true>(o + c, r0, r1);
        else storev2<T>(o + c, r0, r1);
      }
    for (; c < Cv; c += VL) {
      const V r = vec_at(c);
      if (stream) storev<T, true>(o + c, r);
      else storev<T>(o + c, r);
    }
    // The channels past the last whole vector: one partial vector where partial loads and
    // stores are masked (the same bits as value by value, see map_contiguous).
    if (masked_partials<T>() && Cv < C) {
      V kv[coef_slots<R>];
      #pragma GCC unroll 4
      for (int j = 0; j < R::kCoef; ++j) kv[j] = load_partial(kp[j] + Cv, C - Cv);
      map_partial<R, T>(p, o, Cv, C - Cv, kv);
    } else {
      for (int64_t c = Cv; c < C; ++c) one(p, o, c);
    }
  }
  if (stream) store_fence();
}

}  // namespace batchnorm::cpu::BN_ISA
