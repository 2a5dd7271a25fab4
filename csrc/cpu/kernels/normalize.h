// The elementwise forward primitive, y = (x - mean) * scale + shift, for a channels-first
// block of one channel and for channels-last positions (all channels). Used by training
// forward, inference forward and fold alike.
#pragma once
#include "cpu/kernels/walk.h"

namespace batchnorm::cpu::BN_ISA {

template <class T>
void normalize_block(const T* x, T* y, const Layout& L, int64_t begin, int64_t end, acc_t<T> mean,
                     acc_t<T> scale, acc_t<T> shift) {
  using A = acc_t<T>;
  const int64_t sx = L.inner_stride(0), sy = L.inner_stride(1);
  for_each_segment<2>(L, begin, end, [&](const int64_t* off, int64_t len) {
    const T* __restrict xp = x + off[0];
    T* yp = y + off[1];
    if (sx == 1 && sy == 1) {
      if (xp == yp) {
        for (int64_t k = 0; k < len; ++k) yp[k] = store<T>(normalize<A>(load(yp[k]), mean, scale, shift));
      } else {
        T* __restrict yr = yp;
        for (int64_t k = 0; k < len; ++k) yr[k] = store<T>(normalize<A>(load(xp[k]), mean, scale, shift));
      }
    } else {
      for (int64_t k = 0; k < len; ++k) yp[k * sy] = store<T>(normalize<A>(load(xp[k * sx]), mean, scale, shift));
    }
  });
}

template <class T>
void cl_normalize(const T* x, T* y, const Layout& L, int64_t p0, int64_t p1, const acc_t<T>* mean,
                  const acc_t<T>* scale, const acc_t<T>* shift) {
  using A = acc_t<T>;
  const int64_t C = L.channels;
  Odometer<2> pos(L, L.nred, p0);
  for (int64_t p = p0; p < p1; ++p, pos.next()) {
    const T* xp = x + pos.off[0];
    T* yp = y + pos.off[1];
    if (xp == yp) {
      for (int64_t c = 0; c < C; ++c) yp[c] = store<T>(normalize<A>(load(yp[c]), mean[c], scale[c], shift[c]));
    } else {
      const T* __restrict xr = xp;
      T* __restrict yr = yp;
      for (int64_t c = 0; c < C; ++c) yr[c] = store<T>(normalize<A>(load(xr[c]), mean[c], scale[c], shift[c]));
    }
  }
}

}  // namespace batchnorm::cpu::BN_ISA
