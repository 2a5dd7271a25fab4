// Statistics primitives. Channels-first: a block of one channel in two passes (its sum,
// then the sums of deviations from the block mean while the block is still in L1).
// Channels-last: Welford over positions, vectorized across channels, in runs merged in
// double with Chan's formula. Neither ever forms E[x^2] - E[x]^2.
#pragma once
#include "cpu/kernels/simd.h"
#include "cpu/kernels/walk.h"

namespace batchnorm::cpu::BN_ISA {

// Two vector accumulators = lanes<A> lanes; value k of a segment goes to lane k % lanes<A>.
template <class A>
struct Lanes2 {
  vec_t<A> a{}, b{};
  void add(int j, A v) {
    if (j < vlen<A>) a[j] += v;
    else b[j - vlen<A>] += v;
  }
  A total() const {
    A tmp[2 * vlen<A>];
    std::memcpy(tmp, &a, sizeof(a));
    std::memcpy(tmp + vlen<A>, &b, sizeof(b));
    return sum_lanes<A, 2 * vlen<A>>(tmp);
  }
};

// Walks a contiguous run of len values in vectors: body(i, lanes_a, n) is called with
// offsets of full (n == vlen) or final partial (n < vlen) vectors, and `lanes_a` telling
// whether they belong to the first or second accumulator of Lanes2 (value k -> lane k % 2V).
template <class A, class Body>
static inline __attribute__((always_inline)) void walk_vectors(int64_t len, Body&& body) {
  constexpr int V = vlen<A>;
  int64_t i = 0;
  for (; i + 2 * V <= len; i += 2 * V) {
    body(i, true, V);
    body(i + V, false, V);
  }
  bool first = true;
  if (i + V <= len) {
    body(i, true, V);
    i += V;
    first = false;
  }
  if (i < len) body(i, first, len - i);
}

template <class T>
Moments<double> moments(const T* x, const Layout& L, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  const int64_t s = L.inner_stride(0);
  Lanes2<A> sum;
  for_each_segment<1>(L, begin, end, [&](const int64_t* off, int64_t len) {
    const T* p = x + off[0];
    if (s == 1) {
      walk_vectors<A>(len, [&](int64_t i, bool first, int64_t n) {
        const V v = n == vlen<A> ? loadv(p + i) : load_partial(p + i, n);
        (first ? sum.a : sum.b) += v;
      });
    } else {
      for_lanes<2 * vlen<A>>(len, [&](int j, int64_t k) { sum.add(j, load(p[k * s])); });
    }
  });
  const A n = static_cast<A>(end - begin);
  const A center = sum.total() / n;
  const V vc = splat(center);
  Lanes2<A> dev, sq;
  for_each_segment<1>(L, begin, end, [&](const int64_t* off, int64_t len) {
    const T* p = x + off[0];
    constexpr int VL = vlen<A>;
    if (s == 1) {
      walk_vectors<A>(len, [&](int64_t i, bool first, int64_t n) {
        V d = (n == VL ? loadv(p + i) : load_partial(p + i, n)) - vc;
        if (n != VL) d = mask_lanes<A>(d, lanes_below<A>(n));
        (first ? dev.a : dev.b) += d;
        (first ? sq.a : sq.b) += d * d;
      });
    } else {
      for_lanes<2 * VL>(len, [&](int j, int64_t k) {
        const A d = load(p[k * s]) - center;
        dev.add(j, d);
        sq.add(j, d * d);
      });
    }
  });
  return block_moments<double>(static_cast<double>(end - begin), center, dev.total(), sq.total());
}

// Each run of positions is centred on its first position's values before the float Welford
// updates: the deviations are then small and exact, so a channel whose mean dwarfs its
// spread (mean 1e5, std 1e-2) keeps every digit of its variance.
template <class T>
void cl_moments(const T* x, const Layout& L, int64_t p0, int64_t p1, Moments<double>* out, acc_t<T>* scratch) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int VL = vlen<A>;
  const int64_t C = L.channels;
  const int64_t Cv = C / VL * VL;
  A* mean = scratch;  // of the deviations from `center`
  A* m2 = scratch + C;
  A* center = scratch + 2 * C;
  for (int64_t c = 0; c < C; ++c) out[c] = Moments<double>{};
  Odometer<1> pos(L, L.nred, p0);
  for (int64_t r0 = p0; r0 < p1; r0 += kChannelsLastRun) {
    const int64_t r1 = std::min(p1, r0 + kChannelsLastRun);
    const T* first = x + pos.off[0];
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = m2[c] = A(0);
      center[c] = load(first[c]);
    }
    for (int64_t p = r0; p < r1; ++p, pos.next()) {
      const T* xp = x + pos.off[0];
      const A inv = A(1) / static_cast<A>(p - r0 + 1);
      const V vinv = splat(inv);
      for (int64_t c = 0; c < Cv; c += VL) {
        V m, q, k;
        std::memcpy(&m, mean + c, sizeof(V));
        std::memcpy(&q, m2 + c, sizeof(V));
        std::memcpy(&k, center + c, sizeof(V));
        const V v = loadv(xp + c) - k;
        const V d = v - m;
        m += d * vinv;
        q += d * (v - m);
        std::memcpy(mean + c, &m, sizeof(V));
        std::memcpy(m2 + c, &q, sizeof(V));
      }
      for (int64_t c = Cv; c < C; ++c) {
        const A v = load(xp[c]) - center[c];
        const A d = v - mean[c];
        mean[c] += d * inv;
        m2[c] += d * (v - mean[c]);
      }
    }
    const double n = static_cast<double>(r1 - r0);
    for (int64_t c = 0; c < C; ++c)
      out[c] = merge_moments(out[c], Moments<double>{n, static_cast<double>(center[c]) + static_cast<double>(mean[c]),
                                                     static_cast<double>(m2[c])});
  }
}

}  // namespace batchnorm::cpu::BN_ISA
