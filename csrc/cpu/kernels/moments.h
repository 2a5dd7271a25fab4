// Statistics primitives. Channels-first: a block of one channel in two passes (its sum,
// then the sums of deviations from the block mean while the block is still in L1).
// Channels-last: Welford over positions, vectorized across channels, in runs merged in
// double with Chan's formula. Neither ever forms E[x^2] - E[x]^2.
#pragma once
#include "cpu/kernels/walk.h"

namespace batchnorm::cpu::BN_ISA {

template <class T>
Moments<double> moments(const T* x, const Layout& L, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  constexpr int W = lanes<A>;
  const int64_t s = L.inner_stride(0);
  A acc[W] = {};
  for_each_segment<1>(L, begin, end, [&](const int64_t* off, int64_t len) {
    const T* p = x + off[0];
    if (s == 1)
      for_lanes<W>(len, [&](int j, int64_t k) { acc[j] += load(p[k]); });
    else
      for_lanes<W>(len, [&](int j, int64_t k) { acc[j] += load(p[k * s]); });
  });
  const A n = static_cast<A>(end - begin);
  const A center = sum_lanes<A, W>(acc) / n;
  A dev[W] = {}, sq[W] = {};
  for_each_segment<1>(L, begin, end, [&](const int64_t* off, int64_t len) {
    const T* p = x + off[0];
    auto body = [&](int j, A v) {
      const A d = v - center;
      dev[j] += d;
      sq[j] += d * d;
    };
    if (s == 1)
      for_lanes<W>(len, [&](int j, int64_t k) { body(j, load(p[k])); });
    else
      for_lanes<W>(len, [&](int j, int64_t k) { body(j, load(p[k * s])); });
  });
  return block_moments<double>(static_cast<double>(end - begin), center, sum_lanes<A, W>(dev),
                               sum_lanes<A, W>(sq));
}

template <class T>
void cl_moments(const T* x, const Layout& L, int64_t p0, int64_t p1, Moments<double>* out, acc_t<T>* scratch) {
  using A = acc_t<T>;
  const int64_t C = L.channels;
  A* mean = scratch;
  A* m2 = scratch + C;
  for (int64_t c = 0; c < C; ++c) out[c] = Moments<double>{};
  Odometer<1> pos(L, L.nred, p0);
  for (int64_t r0 = p0; r0 < p1; r0 += kChannelsLastRun) {
    const int64_t r1 = std::min(p1, r0 + kChannelsLastRun);
    for (int64_t c = 0; c < C; ++c) mean[c] = m2[c] = A(0);
    for (int64_t p = r0; p < r1; ++p, pos.next()) {
      const T* xp = x + pos.off[0];
      const A inv = A(1) / static_cast<A>(p - r0 + 1);
      for (int64_t c = 0; c < C; ++c) {
        const A v = load(xp[c]);
        const A d = v - mean[c];
        mean[c] += d * inv;
        m2[c] += d * (v - mean[c]);
      }
    }
    const double n = static_cast<double>(r1 - r0);
    for (int64_t c = 0; c < C; ++c)
      out[c] = merge_moments(out[c], Moments<double>{n, static_cast<double>(mean[c]), static_cast<double>(m2[c])});
  }
}

}  // namespace batchnorm::cpu::BN_ISA
