// Every formula of batch norm, written once for the CPU and the CUDA backends: the statistics
// accumulator (Chan's merge of partial moments), the per-channel finalizes (forward
// coefficients, running-statistics update, parameter gradients, backward coefficients, fold)
// and the per-element maps (normalize, dx). The per-element maps are templates over the value
// type, so the same function serves a scalar (CPU tails, CUDA) and a SIMD vector (the CPU's
// vector body); the finalizes take and return scalars. The operation order defines the bits
// (builds use -ffp-contract=off): change a formula here and every backend changes with it.
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

// ---- statistics: the accumulator -----------------------------------------------------------

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

// The biased variance of merged moments, and the moments of a shard given as (mean, biased
// variance, count) (merge_statistics).
template <class M>
BN_HD M biased_variance(const Moments<M>& m) {
  return m.m2 / m.n;
}
template <class M>
BN_HD Moments<M> shard_moments(M n, M mean, M var) {
  return Moments<M>{n, mean, var * n};
}

// ---- forward: per-channel finalize ---------------------------------------------------------

template <class A>
BN_HD A inverse_std(A var, A eps) {
  return A(1) / std::sqrt(var + eps);
}

// The coefficients of normalize for one channel, from its statistics (the batch's in
// training, the running ones in inference) in double and its parameters read in the
// accumulation type A: invstd is formed in double and rounded once.
template <class A>
struct ForwardCoefficients {
  A mean;
  A invstd;
  A scale;  // invstd * weight
  A shift;  // bias
};

template <class A>
BN_HD ForwardCoefficients<A> forward_coefficients(double mean, double var, double eps, A weight, A bias) {
  ForwardCoefficients<A> k;
  k.mean = static_cast<A>(mean);
  k.invstd = static_cast<A>(inverse_std<double>(var, eps));
  k.scale = k.invstd * weight;
  k.shift = bias;
  return k;
}

// PyTorch's convention: running = (1 - momentum) * running + momentum * batch.
template <class A>
BN_HD A running_update(A running, A batch, A momentum) {
  return (A(1) - momentum) * running + momentum * batch;
}

// One channel's running statistics after a training step over `n` values per channel: the
// mean as saved (rounded to A), the variance unbiased (PyTorch's convention), in double.
template <class A>
BN_HD void update_running(double& running_mean, double& running_var, A saved_mean, double batch_var, double n,
                          double momentum) {
  running_mean = running_update<double>(running_mean, static_cast<double>(saved_mean), momentum);
  running_var = running_update<double>(running_var, batch_var * n / (n - 1.0), momentum);
}

// ---- forward: per-element maps -------------------------------------------------------------

// y = (x - mean) * scale + shift with scale = invstd * weight, shift = bias. Subtracting the
// mean first keeps outputs exact when |mean| >> std (x * scale + (bias - mean * scale)
// would lose every digit of a channel with mean 1e5 and std 1e-2). X is A or a vector of A.
template <class X>
BN_HD X normalize(X x, X mean, X scale, X shift) {
  return (x - mean) * scale + shift;
}

// The activation of the fused forward. relu(NaN) is NaN (the comparison is false), as in
// torch.relu; X{} is zero for a scalar and for a vector alike (GCC vectors select per lane).
enum class Activation : int { none = 0, relu = 1 };

template <class X>
BN_HD X relu(X x) {
  return x < X{} ? X{} : x;
}

// The forward map of a recipe: y = act(normalize(x) + residual), with the channel's
// coefficients k = {mean, scale, shift} and inputs in = {x} or {x, residual}. The fused
// variants add their work after the plain normalize's bits, so y without residual and
// activation is bitwise plain batch norm.
// (A recipe is a tag with its input and coefficient counts plus an apply_map overload: free
// functions, so that each per-ISA kernel unit gets its own static copy.)
template <bool Residual, Activation Act>
struct ForwardMap {
  static constexpr int kIn = Residual ? 2 : 1;
  static constexpr int kCoef = 3;
};

template <bool Residual, Activation Act, class X>
BN_HD X apply_map(ForwardMap<Residual, Act>, const X* k, const X* in) {
  X y = normalize(in[0], k[0], k[1], k[2]);
  if constexpr (Residual) y = y + in[1];
  if constexpr (Act == Activation::relu) y = relu(y);
  return y;
}

// ---- backward: per-element reduction terms, per-channel finalize, per-element map ----------

// The term of sum(dy * (x - mean)), the second of backward's two sums (the first is sum(dy)).
template <class X>
BN_HD X grad_term(X dy, X x, X mean) {
  return dy * (x - mean);
}

// dweight = sum(dy * (x - mean)) * invstd, dbias = sum(dy): from the sums in double.
template <class A>
struct ParamGrads {
  A dweight;
  A dbias;
};

template <class A>
BN_HD ParamGrads<A> param_grads(double sum_dy, double sum_dy_xmu, A invstd) {
  return ParamGrads<A>{static_cast<A>(sum_dy_xmu * static_cast<double>(invstd)), static_cast<A>(sum_dy)};
}

// Per-channel coefficients of the backward pass of training-mode batch norm, from the two
// reductions sum(dy) and sum(dy * (x - mean)) over the channel's n values:
//   dx = (dy - mean_dy - (x - mean) * proj) * scale
// with scale = invstd * weight, mean_dy = sum(dy) / n, proj = sum(dy * (x - mean)) * invstd^2 / n.
// X is A, or a vector of A for the CPU's vector body (the coefficients splatted or gathered).
template <class X>
struct BackwardCoefficients {
  X mean;
  X scale;
  X mean_dy;
  X proj;
};

// The sums arrive in double and meet the accumulation type here, once.
template <class A>
BN_HD BackwardCoefficients<A> backward_coefficients(double sum_dy, double sum_dy_xmu, double n, A mean, A invstd,
                                                    A weight) {
  const A sdy = static_cast<A>(sum_dy), sdx = static_cast<A>(sum_dy_xmu), an = static_cast<A>(n);
  BackwardCoefficients<A> k;
  k.mean = mean;
  k.scale = invstd * weight;
  k.mean_dy = sdy / an;
  k.proj = sdx / an * invstd * invstd;
  return k;
}

template <class X>
BN_HD X backward_dx(X dy, X x, const BackwardCoefficients<X>& k) {
  return (dy - k.mean_dy - (x - k.mean) * k.proj) * k.scale;
}

// The backward map of a recipe: dx from inputs {dy, x} and k = {mean, scale, mean_dy, proj}.
struct BackwardMap {
  static constexpr int kIn = 2;
  static constexpr int kCoef = 4;
};

template <class X>
BN_HD X apply_map(BackwardMap, const X* k, const X* in) {
  return backward_dx<X>(in[0], in[1], BackwardCoefficients<X>{k[0], k[1], k[2], k[3]});
}

// The gradient through the fused forward's ReLU: dy where the output y was positive, else 0
// (PyTorch's threshold_backward; a NaN y passes dy on, as torch's mask y <= 0 does).
template <class X>
BN_HD X relu_grad(X dy, X y) {
  return y <= X{} ? X{} : dy;
}

struct ReluGradMap {
  static constexpr int kIn = 2;
  static constexpr int kCoef = 0;
};

template <class X>
BN_HD X apply_map(ReluGradMap, const X*, const X* in) {
  return relu_grad(in[0], in[1]);
}

// A copy (the residual's gradient without an activation is dy itself).
struct IdentityMap {
  static constexpr int kIn = 1;
  static constexpr int kCoef = 0;
};

template <class X>
BN_HD X apply_map(IdentityMap, const X*, const X* in) {
  return in[0];
}

// ---- fold: per-channel finalize and per-element map, in double -----------------------------

// kernel' = kernel * s and bias' = (conv_bias - mean) * s + bias, i.e. normalize(conv_bias)
// with s = weight / sqrt(var + eps) (weight divided last: the fold's own rounding).
BN_HD double fold_scale(double weight, double var, double eps) { return weight / std::sqrt(var + eps); }
BN_HD double fold_kernel(double v, double s) { return v * s; }
BN_HD double fold_bias(double conv_bias, double mean, double s, double bias) {
  return normalize<double>(conv_bias, mean, s, bias);
}

}  // namespace batchnorm
