// The formulas of batch norm, written once for host and device: the Chan merge of partial
// moments, the per-element normalize, the running-statistics update and the backward
// coefficients. The CPU loops and the CUDA kernels both call these; nothing is re-derived.
#pragma once
#include <cmath>

// BN_HD: host+device under nvcc. The per-ISA kernel units predefine it as `static inline`
// so that no copy compiled for one ISA level is shared with code built for another.
#ifndef BN_HD
#if defined(__CUDACC__)
#define BN_HD __host__ __device__ __forceinline__
#else
#define BN_HD inline
#endif
#endif

namespace batchnorm {

// Partial moments of a set of values: count, mean and M2 = sum((v - mean)^2).
template <class M>
struct Moments {
  M n = 0;
  M mean = 0;
  M m2 = 0;
};

// Chan et al.: the moments of the union of two disjoint sets, exact up to rounding and
// stable at any magnitude (no E[x^2] - E[x]^2). The merge order is fixed by the callers so
// results are bitwise reproducible.
template <class M>
BN_HD Moments<M> merge_moments(const Moments<M>& a, const Moments<M>& b) {
  if (b.n == M(0)) return a;
  if (a.n == M(0)) return b;
  Moments<M> r;
  r.n = a.n + b.n;
  const M delta = b.mean - a.mean;
  const M wb = b.n / r.n;
  r.mean = a.mean + delta * wb;
  r.m2 = a.m2 + b.m2 + delta * delta * (a.n * wb);
  return r;
}

// Moments of one block from its two passes: sum of values and sum of squared deviations
// from the block's own provisional mean `center`, with the first-order correction
// (sum(v - center))^2 / n that removes the rounding of `center`.
template <class M>
BN_HD Moments<M> block_moments(M n, M center, M sum_dev, M sum_sq_dev) {
  Moments<M> r;
  r.n = n;
  if (n == M(0)) return r;
  r.mean = center + sum_dev / n;
  const M m2 = sum_sq_dev - sum_dev * sum_dev / n;
  // Rounding can leave a constant block's M2 a hair below zero: clamp that, but written so
  // that a NaN (from a NaN or Inf value) falls through and poisons the channel's variance,
  // as `m2 > 0 ? m2 : 0` did not (it turned NaN into a healthy-looking 0).
  r.m2 = m2 < M(0) ? M(0) : m2;
  return r;
}

template <class A>
BN_HD A inverse_std(A var, A eps) {
  return A(1) / std::sqrt(var + eps);
}

// y = (x - mean) * scale + shift with scale = invstd * weight, shift = bias. Subtracting the
// mean first keeps outputs exact when |mean| >> std (x * scale + (bias - mean * scale)
// would lose every digit of a channel with mean 1e5 and std 1e-2).
template <class A>
BN_HD A normalize(A x, A mean, A scale, A shift) {
  return (x - mean) * scale + shift;
}

// PyTorch's convention: running = (1 - momentum) * running + momentum * batch.
template <class A>
BN_HD A running_update(A running, A batch, A momentum) {
  return (A(1) - momentum) * running + momentum * batch;
}

// Per-channel coefficients of the backward pass of training-mode batch norm, from the two
// reductions sum(dy) and sum(dy * (x - mean)) over the channel's n values:
//   dx = (dy - mean_dy - (x - mean) * proj) * scale
// with scale = invstd * weight, mean_dy = sum(dy) / n, proj = sum(dy * (x - mean)) * invstd^2 / n.
template <class A>
struct BackwardCoefficients {
  A mean;
  A scale;
  A mean_dy;
  A proj;
};

template <class A>
BN_HD BackwardCoefficients<A> backward_coefficients(A sum_dy, A sum_dy_xmu, A n, A mean, A invstd,
                                                    A weight) {
  BackwardCoefficients<A> k;
  k.mean = mean;
  k.scale = invstd * weight;
  k.mean_dy = sum_dy / n;
  k.proj = sum_dy_xmu / n * invstd * invstd;
  return k;
}

template <class A>
BN_HD A backward_dx(A dy, A x, const BackwardCoefficients<A>& k) {
  return (dy - k.mean_dy - (x - k.mean) * k.proj) * k.scale;
}

}  // namespace batchnorm
