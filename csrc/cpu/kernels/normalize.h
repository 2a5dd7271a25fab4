// The elementwise forward primitive, y = (x - mean) * scale + shift, for a channels-first
// block of one channel and for channels-last positions (all channels). Used by training
// forward, inference forward and fold alike. `nt` selects non-temporal stores, for outputs
// too large to stay in cache (they then skip the read-for-ownership of y).
#pragma once
#include "cpu/kernels/moments.h"
#include "cpu/kernels/simd.h"
#include "cpu/kernels/walk.h"

namespace batchnorm::cpu::BN_ISA {

// Applies y[k] = op(x[k]) over a contiguous run of n values; op maps vectors and scalars.
template <class T, class Op>
static inline __attribute__((always_inline)) void map_contiguous(const T* xp, T* yp, int64_t n, bool nt, Op&& op) {
  using A = acc_t<T>;
  constexpr int VL = vlen<A>;
  int64_t i = 0;
  if (nt) {
    // Scalar head up to the vector store alignment, then streaming vector stores.
    const uintptr_t align = VL * sizeof(T);
    while (i < n && (reinterpret_cast<uintptr_t>(yp + i) & (align - 1)) != 0) {
      store_at(yp + i, op(load_at(xp + i)));
      ++i;
    }
    for (; i + VL <= n; i += VL) storev<T, true>(yp + i, op(loadv(xp + i)));
  } else {
    for (; i + VL <= n; i += VL) storev<T>(yp + i, op(loadv(xp + i)));
  }
  // A long tail goes through one partial vector; a short one is cheaper element by element.
  if (n - i >= VL / 2) store_partial(yp + i, op(load_partial(xp + i, n - i)), n - i);
  else
    for (; i < n; ++i) store_at(yp + i, op(load_at(xp + i)));
}

// normalize_block over short contiguous rows (see ShortRow): per row, every vector is loaded
// before any is stored (y may be x), the tail vector ends at the row's end and rewrites the
// values the previous vector already wrote with the same bits. Regular stores: a 7x7 row is
// too short to reach the alignment of streaming stores.
template <class T, int NV>
void normalize_short_rows(const T* x, T* y, const Layout& L, int64_t begin, int64_t end, acc_t<T> mean,
                          acc_t<T> scale, acc_t<T> shift) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int VL = vlen<A>;
  const V vm = splat(mean), vs = splat(scale), vb = splat(shift);
  for_each_segment<2>(L, begin, end, [&](const int64_t* off, int64_t len) {
    const T* xp = x + off[0];
    T* yp = y + off[1];
    if (len < VL) {
      for (int64_t k = 0; k < len; ++k) store_at(yp + k, normalize<A>(load_at(xp + k), mean, scale, shift));
      return;
    }
    const int64_t full = len / VL, tail = len - full * VL;
    V v[NV + 1];
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k)
      if (k < full) v[k] = loadv(xp + k * VL);
    if (tail != 0) v[NV] = loadv(xp + len - VL);
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k)
      if (k < full) storev<T>(yp + k * VL, (v[k] - vm) * vs + vb);
    if (tail != 0) storev<T>(yp + len - VL, (v[NV] - vm) * vs + vb);
  });
}

template <class T>
void normalize_block(const T* x, T* y, const Layout& L, int64_t begin, int64_t end, acc_t<T> mean,
                     acc_t<T> scale, acc_t<T> shift, bool nt) {
  using A = acc_t<T>;
  if (L.inner_stride(1) == 1 && with_short_rows<A>(L, 0, [&](auto nv) {
        normalize_short_rows<T, decltype(nv)::value>(x, y, L, begin, end, mean, scale, shift);
      }))
    return;
  const int64_t sx = L.inner_stride(0), sy = L.inner_stride(1);
  const vec_t<A> vm = splat(mean), vs = splat(scale), vb = splat(shift);
  for_each_segment<2>(L, begin, end, [&](const int64_t* off, int64_t len) {
    const T* xp = x + off[0];
    T* yp = y + off[1];
    if (sx == 1 && sy == 1) {
      map_contiguous(xp, yp, len, nt, [&](auto v) {
        if constexpr (std::is_same_v<decltype(v), A>) return normalize<A>(v, mean, scale, shift);
        else return (v - vm) * vs + vb;
      });
    } else {
      for (int64_t k = 0; k < len; ++k) store_at(yp + k * sy, normalize<A>(load_at(xp + k * sx), mean, scale, shift));
    }
  });
  if (nt) store_fence();
}

template <class T>
void cl_normalize(const T* x, T* y, const Layout& L, int64_t p0, int64_t p1, const acc_t<T>* mean,
                  const acc_t<T>* scale, const acc_t<T>* shift, bool nt) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int VL = vlen<A>;
  const int64_t C = L.channels;
  const int64_t Cv = C / VL * VL;
  // Streaming stores need each position's channel run to start aligned.
  const bool stream = nt && positions_aligned(L, 1, y, VL * sizeof(T));
  Odometer<2> pos(L, L.nred, p0);
  for (int64_t p = p0; p < p1; ++p, pos.next()) {
    const T* xp = x + pos.off[0];
    T* yp = y + pos.off[1];
    for (int64_t c = 0; c < Cv; c += VL) {
      V m, s, b;
      std::memcpy(&m, mean + c, sizeof(V));
      std::memcpy(&s, scale + c, sizeof(V));
      std::memcpy(&b, shift + c, sizeof(V));
      const V r = (loadv(xp + c) - m) * s + b;
      if (stream) storev<T, true>(yp + c, r);
      else storev<T>(yp + c, r);
    }
    for (int64_t c = Cv; c < C; ++c) store_at(yp + c, normalize<A>(load_at(xp + c), mean[c], scale[c], shift[c]));
  }
  if (stream) store_fence();
}

}  // namespace batchnorm::cpu::BN_ISA
