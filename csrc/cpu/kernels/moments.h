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
  // Strided rows are gathered into the same lanes the contiguous walk uses.
  auto get = [s](const T* p, int64_t i, int64_t n) -> V {
    if (s != 1) return load_strided(p + i * s, s, n);
    return n == vlen<A> ? loadv(p + i) : load_partial(p + i, n);
  };
  Lanes2<A> sum;
  for_each_segment<1>(L, begin, end, [&](const int64_t* off, int64_t len) {
    const T* p = x + off[0];
    walk_vectors<A>(len, [&](int64_t i, bool first, int64_t n) { (first ? sum.a : sum.b) += get(p, i, n); });
  });
  const A n = static_cast<A>(end - begin);
  const A center = sum.total() / n;
  const V vc = splat(center);
  Lanes2<A> dev, sq;
  for_each_segment<1>(L, begin, end, [&](const int64_t* off, int64_t len) {
    const T* p = x + off[0];
    walk_vectors<A>(len, [&](int64_t i, bool first, int64_t n) {
      V d = get(p, i, n) - vc;
      if (n != vlen<A>) d = mask_lanes<A>(d, lanes_below<A>(n));
      (first ? dev.a : dev.b) += d;
      (first ? sq.a : sq.b) += d * d;
    });
  });
  return block_moments<double>(static_cast<double>(end - begin), center, dev.total(), sq.total());
}

// Channels-last runs of positions are reduced like channels-first blocks: their per-channel
// sums, then the deviations from the run's own mean while the run is still in cache (a run
// holds at most kChannelsLastRunBytes), so neither a mean that dwarfs the spread nor an
// outlier costs digits.
template <class T>
void cl_moments(const T* x, const Layout& L, int64_t p0, int64_t p1, Moments<double>* out, acc_t<T>* scratch) {
  using A = acc_t<T>;
  using V = vec_t<A>;
  constexpr int VL = vlen<A>;
  const int64_t C = L.channels;
  const int64_t Cv = C / VL * VL;
  const int64_t run = channels_last_run(C, sizeof(T));
  A* center = scratch;
  A* dev = scratch + C;
  A* sq = scratch + 2 * C;
  for (int64_t c = 0; c < C; ++c) out[c] = Moments<double>{};
  Odometer<1> pos(L, L.nred, p0);
  for (int64_t r0 = p0; r0 < p1; r0 += run) {
    const int64_t r1 = std::min(p1, r0 + run);
    const A n = static_cast<A>(r1 - r0);
    Odometer<1> again = pos;
    for (int64_t c = 0; c < C; ++c) center[c] = dev[c] = sq[c] = A(0);
    for (int64_t p = r0; p < r1; ++p, pos.next()) {
      const T* xp = x + pos.off[0];
      for (int64_t c = 0; c < Cv; c += VL) {
        V t;
        std::memcpy(&t, center + c, sizeof(V));
        t += loadv(xp + c);
        std::memcpy(center + c, &t, sizeof(V));
      }
      for (int64_t c = Cv; c < C; ++c) center[c] += load(xp[c]);
    }
    for (int64_t c = 0; c < C; ++c) center[c] /= n;
    for (int64_t p = r0; p < r1; ++p, again.next()) {
      const T* xp = x + again.off[0];
      for (int64_t c = 0; c < Cv; c += VL) {
        V k, e, q;
        std::memcpy(&k, center + c, sizeof(V));
        std::memcpy(&e, dev + c, sizeof(V));
        std::memcpy(&q, sq + c, sizeof(V));
        const V d = loadv(xp + c) - k;
        e += d;
        q += d * d;
        std::memcpy(dev + c, &e, sizeof(V));
        std::memcpy(sq + c, &q, sizeof(V));
      }
      for (int64_t c = Cv; c < C; ++c) {
        const A d = load(xp[c]) - center[c];
        dev[c] += d;
        sq[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c)
      out[c] = merge_moments(out[c], block_moments<double>(static_cast<double>(r1 - r0), center[c], dev[c], sq[c]));
  }
}

}  // namespace batchnorm::cpu::BN_ISA
