// Backward primitives: the one fused reduction (sum dy, sum dy * (x - mean)) and the
// elementwise dx that recomputes x - mean rather than storing x_hat.
#pragma once
#include "cpu/kernels/walk.h"

namespace batchnorm::cpu::BN_ISA {

template <class T>
void grad_sums(const T* dy, const T* x, const Layout& L, int64_t begin, int64_t end, acc_t<T> mean,
               double* sum_dy, double* sum_dy_xmu) {
  using A = acc_t<T>;
  constexpr int W = lanes<A>;
  const int64_t sd = L.inner_stride(0), sx = L.inner_stride(1);
  A a1[W] = {}, a2[W] = {};
  for_each_segment<2>(L, begin, end, [&](const int64_t* off, int64_t len) {
    const T* dp = dy + off[0];
    const T* xp = x + off[1];
    auto body = [&](int j, A g, A v) {
      a1[j] += g;
      a2[j] += g * (v - mean);
    };
    if (sd == 1 && sx == 1)
      for_lanes<W>(len, [&](int j, int64_t k) { body(j, load(dp[k]), load(xp[k])); });
    else
      for_lanes<W>(len, [&](int j, int64_t k) { body(j, load(dp[k * sd]), load(xp[k * sx])); });
  });
  *sum_dy = static_cast<double>(sum_lanes<A, W>(a1));
  *sum_dy_xmu = static_cast<double>(sum_lanes<A, W>(a2));
}

template <class T>
void grad_apply(const T* dy, const T* x, T* dx, const Layout& L, int64_t begin, int64_t end,
                const BackwardCoefficients<acc_t<T>>& k) {
  using A = acc_t<T>;
  const BackwardCoefficients<A> kk = k;
  const int64_t sd = L.inner_stride(0), sx = L.inner_stride(1), so = L.inner_stride(2);
  for_each_segment<3>(L, begin, end, [&](const int64_t* off, int64_t len) {
    const T* dp = dy + off[0];
    const T* xp = x + off[1];
    T* op = dx + off[2];
    if (sd == 1 && sx == 1 && so == 1) {
      for (int64_t i = 0; i < len; ++i) op[i] = store<T>(backward_dx<A>(load(dp[i]), load(xp[i]), kk));
    } else {
      for (int64_t i = 0; i < len; ++i)
        op[i * so] = store<T>(backward_dx<A>(load(dp[i * sd]), load(xp[i * sx]), kk));
    }
  });
}

template <class T>
void cl_grad_sums(const T* dy, const T* x, const Layout& L, int64_t p0, int64_t p1, const acc_t<T>* mean,
                  double* sum_dy, double* sum_dy_xmu, acc_t<T>* scratch) {
  using A = acc_t<T>;
  const int64_t C = L.channels;
  A* s1 = scratch;
  A* s2 = scratch + C;
  for (int64_t c = 0; c < C; ++c) sum_dy[c] = sum_dy_xmu[c] = 0.0;
  Odometer<2> pos(L, L.nred, p0);
  for (int64_t r0 = p0; r0 < p1; r0 += kChannelsLastRun) {
    const int64_t r1 = std::min(p1, r0 + kChannelsLastRun);
    for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = A(0);
    for (int64_t p = r0; p < r1; ++p, pos.next()) {
      const T* __restrict dp = dy + pos.off[0];
      const T* __restrict xp = x + pos.off[1];
      for (int64_t c = 0; c < C; ++c) {
        const A g = load(dp[c]);
        s1[c] += g;
        s2[c] += g * (load(xp[c]) - mean[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      sum_dy[c] += static_cast<double>(s1[c]);
      sum_dy_xmu[c] += static_cast<double>(s2[c]);
    }
  }
}

template <class T>
void cl_grad_apply(const T* dy, const T* x, T* dx, const Layout& L, int64_t p0, int64_t p1, const acc_t<T>* mean,
                   const acc_t<T>* scale, const acc_t<T>* mean_dy, const acc_t<T>* proj) {
  using A = acc_t<T>;
  const int64_t C = L.channels;
  Odometer<3> pos(L, L.nred, p0);
  for (int64_t p = p0; p < p1; ++p, pos.next()) {
    const T* dp = dy + pos.off[0];
    const T* xp = x + pos.off[1];
    T* op = dx + pos.off[2];
    for (int64_t c = 0; c < C; ++c) {
      const BackwardCoefficients<A> k{mean[c], scale[c], mean_dy[c], proj[c]};
      op[c] = store<T>(backward_dx<A>(load(dp[c]), load(xp[c]), k));
    }
  }
}

}  // namespace batchnorm::cpu::BN_ISA
