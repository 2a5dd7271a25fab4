// Every formula of batch norm, written once for the CPU and the CUDA backends: the statistics
// accumulator (Chan's merge of partial moments), the per-channel finalizes (forward
// coefficients, running-statistics update, parameter gradients, backward coefficients, fold)
// and the per-element maps (normalize, dx). The per-element maps are templates over the value
// type, so the same function serves a scalar (CPU tails, CUDA) and a SIMD vector (the CPU's
// vector body); the finalizes take and return scalars. The operation order defines the bits
// (builds use -ffp-contract=off): change a formula here and every backend changes with it.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>

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
// The merge's weights depend on the two counts alone, so callers that merge many channels
// with the same counts (every channel of a channels-last group) compute them once
// (merge_weights) and apply them per channel (merge_weighted): the same operations as
// merge_moments, the same bits.
template <class M>
struct MergeWeights {
  M n;   // a.n + b.n
  M wb;  // b.n / n
  M aw;  // a.n * wb
};
template <class M>
BN_HD MergeWeights<M> merge_weights(M an, M bn) {
  const M n = an + bn;
  const M wb = bn / n;
  return MergeWeights<M>{n, wb, an * wb};
}
template <class M>
BN_HD Moments<M> merge_weighted(const Moments<M>& a, const Moments<M>& b, const MergeWeights<M>& w) {
  Moments<M> r;
  r.n = w.n;
  const M delta = b.mean - a.mean;
  r.mean = a.mean + delta * w.wb;
  r.m2 = a.m2 + b.m2 + delta * delta * w.aw;
  return r;
}
template <class M>
BN_HD Moments<M> merge_moments(const Moments<M>& a, const Moments<M>& b) {
  if (b.n == M(0)) return a;
  if (a.n == M(0)) return b;
  return merge_weighted(a, b, merge_weights(a.n, b.n));
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
// variance, count) (merge_statistics). A negative variance is no variance: its sum of squares
// is NaN, so the channel's merged variance comes back NaN, as forward_inference's output does
// for one (merged as it was, it had pulled the channel's variance down to a plausible value or
// below zero).
template <class M>
BN_HD M biased_variance(const Moments<M>& m) {
  return m.m2 / m.n;
}
template <class M>
BN_HD Moments<M> shard_moments(M n, M mean, M var) {
  return Moments<M>{n, mean, var < M(0) ? std::numeric_limits<M>::quiet_NaN() : var * n};
}

// merge_statistics' accumulator: shards given as (count, mean, biased variance) merged in
// shard order (Chan), overflow-safe. Finite shards can overflow the plain merge where the
// result is finite: means of opposite sign near double's limit (their delta), a count x
// variance past it (the sum of squares), a delta^2 x weight. So beside the plain merge the
// accumulator keeps a second one of the values scaled by 2^-scale, the scale a power of two
// raised only when a shard's magnitude passes 2^kMergeHeadroom (about 7e134), where every
// product of the merge stays below 2^961 (counts up to 2^63). The result is the plain merge's,
// its bits unchanged, wherever that is finite; the scaled one's where it is not (scaling by a
// power of two changes no rounding but subnormals, which there lie 2^-1000 below the result).
constexpr int kMergeHeadroom = 448;
struct ScaledMoments {
  Moments<double> plain;
  Moments<double> m;  // of the values times 2^-scale
  int scale = 0;
};
// The scale one shard asks for: the binary exponent of max(|mean|, sqrt(var)) past the
// headroom. A NaN, an Inf or a negative variance asks for none: it propagates as it is.
BN_HD int shard_scale(double mean, double var) {
  int e = 0;
  if (std::isfinite(mean) && mean != 0.0) e = std::ilogb(mean);
  if (std::isfinite(var) && var > 0.0) e = std::max(e, std::ilogb(var) / 2 + 1);
  return std::max(0, e - kMergeHeadroom);
}
BN_HD ScaledMoments merge_shard(ScaledMoments acc, double n, double mean, double var) {
  if (n == 0.0) return acc;
  acc.plain = merge_moments(acc.plain, shard_moments(n, mean, var));
  const int scale = std::max(acc.scale, shard_scale(mean, var));
  if (scale != acc.scale) {
    acc.m.mean = std::ldexp(acc.m.mean, acc.scale - scale);
    acc.m.m2 = std::ldexp(acc.m.m2, 2 * (acc.scale - scale));
    acc.scale = scale;
  }
  // (A negative variance stays negative, however small: scaled to -0 it would pass for none.)
  const double scaled_var = var < 0.0 ? var : std::ldexp(var, -2 * scale);
  acc.m = merge_moments(acc.m, shard_moments(n, std::ldexp(mean, -scale), scaled_var));
  return acc;
}
// The merged (mean, biased variance): the plain merge's where finite, else the scaled one's
// back at the values' scale. A variance past double's range is Inf (shards at +-1e308: about
// 1e616); the mean of finite shards lies between theirs, so one rounded a hair past double's
// largest (a weight rounded to 1) is clamped to it.
BN_HD bool plain_merge_holds(const ScaledMoments& a) {
  return a.scale == 0 || (std::isfinite(a.plain.mean) && std::isfinite(a.plain.m2));
}
BN_HD double merged_mean(const ScaledMoments& a) {
  if (plain_merge_holds(a)) return a.plain.mean;
  const double mean = std::ldexp(a.m.mean, a.scale);
  constexpr double largest = std::numeric_limits<double>::max();
  return std::isfinite(a.m.mean) ? std::fmin(std::fmax(mean, -largest), largest) : mean;
}
BN_HD double merged_variance(const ScaledMoments& a) {
  if (plain_merge_holds(a)) return biased_variance(a.plain);
  return std::ldexp(biased_variance(a.m), 2 * a.scale);
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

// sqrt(a + b) where the sum passes double's largest though both terms are finite (a variance
// or an eps near 1e308): 2 sqrt(a / 4 + b / 4), instead of sqrt(Inf).
BN_HD double sqrt_of_sum(double a, double b) {
  const double s = a + b;
  if (s <= std::numeric_limits<double>::max() || !(std::isfinite(a) && std::isfinite(b))) return std::sqrt(s);
  return 2.0 * std::sqrt(0.25 * a + 0.25 * b);
}

// Whether forward_coefficients overflowed: an invstd of 0, from var + eps past double's
// largest (both near 1e308), where 1 / sqrt(var + eps) fits (widen_forward_coefficients).
// (An invstd past A's range, a constant float channel with eps 1e-300, stays Inf, as its
// scale: x == mean then gives 0 x Inf = NaN, as PyTorch's; no finite scale gives every other
// value its own y, so none is made up.)
template <class A>
BN_HD bool forward_coefficients_overflowed(const ForwardCoefficients<A>& k) {
  return k.invstd == A(0);
}

// forward_coefficients' invstd and scale where forward_coefficients_overflowed (CPU: a loop
// of its own after the vectorized one; CUDA: in line); other channels' bits are unchanged.
template <class A>
BN_HD void widen_forward_coefficients(ForwardCoefficients<A>& k, double var, double eps, A weight) {
  k.invstd = static_cast<A>(1.0 / sqrt_of_sum(var, eps));
  k.scale = k.invstd * weight;
}

// PyTorch's convention: running = (1 - momentum) * running + momentum * batch. Momentum 1
// takes the batch's whatever the running value held: 0 * Inf would make a NaN of a statistic
// the update forgets (the JAX handlers seed a momentum-1 update with batch renorm's running
// statistics to read the batch's back).
template <class A>
BN_HD A running_update(A running, A batch, A momentum) {
  return momentum == A(1) ? batch : (A(1) - momentum) * running + momentum * batch;
}

// The training variants' choices for the running update (API.md "Training variants").
struct RunningOptions {
  bool unbiased = true;         // running_var takes the unbiased batch variance (PyTorch), else the biased (Keras, Flax)
  bool skip_nonfinite = false;  // a channel whose batch statistics are not finite keeps its running statistics
  // dtype_overflow of the running statistics' dtypes: skip_nonfinite also keeps a channel whose
  // update would store a non-finite value where a finite one was (a float16 running variance
  // past 65504). One already NaN or Inf is no reason: its channel updates as without the option.
  double mean_overflow = HUGE_VAL;
  double var_overflow = HUGE_VAL;
};

// Whether v stays finite once stored in a dtype of that overflow (DTypeInfo::overflow). Both
// backends round a double to its dtype once (cpu/convert.h store, cuda/convert.cuh store_any),
// so v itself is the test: false for a NaN, and for overflow = HUGE_VAL, isfinite.
BN_HD bool stored_finite(double v, double overflow) { return std::fabs(v) < overflow; }

// The unbiased variance of n values from their biased one: var * n / (n - 1), or, where
// var * n overflows though var is finite (float64 variances near 1.8e308), var * (n / (n - 1)).
// (The test reads var, not the quotient, against a limit the loops hoist: tested on the
// quotient it had waited for the division, 5% of (16, 2048) float32 training.)
BN_HD double unbiased_variance(double var, double n) {
  if (__builtin_expect(var > std::numeric_limits<double>::max() / n, 0)) {
    const double t = var * n;
    return std::isinf(t) && std::isfinite(var) ? var * (n / (n - 1.0)) : t / (n - 1.0);
  }
  return var * n / (n - 1.0);
}

// One channel's running statistics after a training step over `n` values per channel: the
// mean as saved (rounded to A), the variance unbiased (PyTorch's convention) or biased, in
// double. With skip_nonfinite, a NaN or Inf batch mean or variance (a step a loss scaler will
// skip) leaves both untouched, bit for bit: finite as the accumulation type A holds them (the
// batch statistics the caller sees, JAX's test), not only in double, where the variance of
// finite float32 values about 3e38 (9e76) passed and came back Inf as the running variance;
// and the updated values finite as the running statistics' dtypes store them.
template <class A>
BN_HD void update_running(double& running_mean, double& running_var, A saved_mean, double batch_var, double n,
                          double momentum, RunningOptions o = {}) {
  const double used_var = o.unbiased ? unbiased_variance(batch_var, n) : batch_var;
  if (o.skip_nonfinite && !(std::isfinite(static_cast<double>(saved_mean)) &&
                            std::isfinite(static_cast<double>(static_cast<A>(batch_var))) &&
                            std::isfinite(static_cast<double>(static_cast<A>(used_var)))))
    return;
  const double mean = running_update<double>(running_mean, static_cast<double>(saved_mean), momentum);
  const double var = running_update<double>(running_var, used_var, momentum);
  if (o.skip_nonfinite && ((!stored_finite(mean, o.mean_overflow) && std::isfinite(running_mean)) ||
                           (!stored_finite(var, o.var_overflow) && std::isfinite(running_var))))
    return;
  running_mean = mean;
  running_var = var;
}

// ---- batch renormalization (Ioffe 2017): per-channel finalize ------------------------------

// clip(v, lo, hi) that lets a NaN through (both comparisons are false for it).
BN_HD double clip(double v, double lo, double hi) { return v < lo ? lo : (v > hi ? hi : v); }

// r = clip(sigma_B / sigma_run, 1/rmax, rmax), d = clip((mu_B - mu_run) / sigma_run, -dmax,
// dmax) with sigma = sqrt(var + eps), from the running statistics before this step's update;
// in double, rounded to A once. Both are constants to the gradient.
template <class A>
struct Renorm {
  A r;
  A d;
};

template <class A>
BN_HD Renorm<A> renorm_correction(double batch_mean, double batch_var, double running_mean, double running_var,
                                  double eps, double rmax, double dmax) {
  const double sigma_batch = sqrt_of_sum(batch_var, eps), sigma_run = sqrt_of_sum(running_var, eps);
  return Renorm<A>{static_cast<A>(clip(sigma_batch / sigma_run, 1.0 / rmax, rmax)),
                   static_cast<A>(clip((batch_mean - running_mean) / sigma_run, -dmax, dmax))};
}

// The renormalized output weight * (x_hat * r + d) + bias as normalize's coefficients:
// scale = invstd * r * weight, shift = d * weight + bias (the mean is the batch's).
template <class A>
BN_HD void renormalize(ForwardCoefficients<A>& k, Renorm<A> rd, A weight, A bias) {
  k.scale = k.invstd * rd.r * weight;
  k.shift = rd.d * weight + bias;
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

#if defined(BN_ISA)
}  // namespace batchnorm
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <utility>
namespace batchnorm {
// The CPU kernel units' vector body (GCC vectors of 64 bytes): GCC lowers `?:` and compares
// on vectors wider than the ISA's registers lane by lane, so the two selects are written
// per register here, with the same results lane for lane: MAXPS returns its second operand
// for a NaN (relu(NaN) = NaN, relu(-0) = -0), and the ordered compare y <= 0 is false for a
// NaN y. (Non-template overloads with internal linkage: each ISA unit has its own.)
namespace vector_select {
typedef float f32x16 __attribute__((vector_size(64)));
typedef double f64x8 __attribute__((vector_size(64)));
}  // namespace vector_select

// A 64-byte vector as kRegs registers R of the level and back. Joined by shuffles
// (join_regs): through a memcpy from an array of registers GCC 12 rebuilt the vector lane by
// lane on the stack under AVX2 (a store, then 8 loads and inserts per register) in every map
// of the fused ReLU. Split by a memcpy, which takes a vector computed or converted at full
// width apart for free, or by shuffles (split_regs) for one GCC 12 joined from halves (float16
// loaded under AVX2, joined_halves in cpu/kernels/simd.h), which the memcpy spilled in turn.
// (simd.h splits by split_regs too: AVX2 stores by halves, float16's accumulators.)
template <class R, int Off, class V, std::size_t... I>
static inline __attribute__((always_inline)) R reg_at(V x, std::index_sequence<I...>) {
  return (R)__builtin_shufflevector(x, x, (Off + static_cast<int>(I))...);
}
template <class R, int kRegs, class V, std::size_t... P>
static inline __attribute__((always_inline)) void split_regs(V x, R (&a)[kRegs], std::index_sequence<P...>) {
  constexpr int n = sizeof(R) / sizeof(x[0]);
  ((a[P] = reg_at<R, static_cast<int>(P) * n>(x, std::make_index_sequence<n>{})), ...);
}
template <class H, std::size_t... I>
static inline __attribute__((always_inline)) auto join_pair(H lo, H hi, std::index_sequence<I...>) {
  return __builtin_shufflevector(lo, hi, static_cast<int>(I)...);
}
template <class V, class R, int kRegs>
static inline __attribute__((always_inline)) V join_regs(const R (&a)[kRegs]) {
  constexpr int n = sizeof(R) / sizeof(V{}[0]);
  if constexpr (kRegs == 1) {
    return (V)a[0];
  } else if constexpr (kRegs == 2) {
    return (V)join_pair(a[0], a[1], std::make_index_sequence<2 * n>{});
  } else {
    static_assert(kRegs == 4, "1, 2 or 4 registers a vector");
    return (V)join_pair(join_pair(a[0], a[1], std::make_index_sequence<2 * n>{}),
                        join_pair(a[2], a[3], std::make_index_sequence<2 * n>{}), std::make_index_sequence<4 * n>{});
  }
}

// relu and relu_grad of one 64-byte vector V, as kRegs registers R of the level (MAX and
// ANDNOT of an ordered compare); relu_grad_joined: relu_grad of inputs joined from halves.
#define BN_VECTOR_SELECTS(V, R, kRegs, MAX, ANDNOT_LE, ZERO)                                       \
  static inline __attribute__((always_inline)) V relu(V x) {                                        \
    R a[kRegs];                                                                                     \
    __builtin_memcpy(a, &x, sizeof(x));                                                             \
    for (int i = 0; i < kRegs; ++i) a[i] = MAX(ZERO(), a[i]);                                       \
    return join_regs<V>(a);                                                                         \
  }                                                                                                 \
  static inline __attribute__((always_inline)) V relu_grad_of(const R(&dy)[kRegs],                 \
                                                               const R(&y)[kRegs]) {                \
    R a[kRegs];                                                                                     \
    for (int i = 0; i < kRegs; ++i) a[i] = ANDNOT_LE(y[i], dy[i]);                                  \
    return join_regs<V>(a);                                                                         \
  }                                                                                                 \
  static inline __attribute__((always_inline)) V relu_grad(V dy, V y) {                             \
    R a[kRegs], b[kRegs];                                                                           \
    __builtin_memcpy(a, &dy, sizeof(dy));                                                           \
    __builtin_memcpy(b, &y, sizeof(y));                                                             \
    return relu_grad_of(a, b);                                                                      \
  }                                                                                                 \
  static inline __attribute__((always_inline)) V relu_grad_joined(V dy, V y) {                      \
    R a[kRegs], b[kRegs];                                                                           \
    split_regs(dy, a, std::make_index_sequence<kRegs>{});                                           \
    split_regs(y, b, std::make_index_sequence<kRegs>{});                                            \
    return relu_grad_of(a, b);                                                                      \
  }

#if defined(__AVX512F__)
#define BN_LE_PS(y, dy) _mm512_maskz_mov_ps(~_mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LE_OQ), dy)
#define BN_LE_PD(y, dy) _mm512_maskz_mov_pd(~_mm512_cmp_pd_mask(y, _mm512_setzero_pd(), _CMP_LE_OQ), dy)
BN_VECTOR_SELECTS(vector_select::f32x16, __m512, 1, _mm512_max_ps, BN_LE_PS, _mm512_setzero_ps)
BN_VECTOR_SELECTS(vector_select::f64x8, __m512d, 1, _mm512_max_pd, BN_LE_PD, _mm512_setzero_pd)
#elif defined(__AVX__)
#define BN_LE_PS(y, dy) _mm256_andnot_ps(_mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_LE_OQ), dy)
#define BN_LE_PD(y, dy) _mm256_andnot_pd(_mm256_cmp_pd(y, _mm256_setzero_pd(), _CMP_LE_OQ), dy)
BN_VECTOR_SELECTS(vector_select::f32x16, __m256, 2, _mm256_max_ps, BN_LE_PS, _mm256_setzero_ps)
BN_VECTOR_SELECTS(vector_select::f64x8, __m256d, 2, _mm256_max_pd, BN_LE_PD, _mm256_setzero_pd)
#elif defined(__SSE2__)
#define BN_LE_PS(y, dy) _mm_andnot_ps(_mm_cmple_ps(y, _mm_setzero_ps()), dy)
#define BN_LE_PD(y, dy) _mm_andnot_pd(_mm_cmple_pd(y, _mm_setzero_pd()), dy)
BN_VECTOR_SELECTS(vector_select::f32x16, __m128, 4, _mm_max_ps, BN_LE_PS, _mm_setzero_ps)
BN_VECTOR_SELECTS(vector_select::f64x8, __m128d, 4, _mm_max_pd, BN_LE_PD, _mm_setzero_pd)
#endif
#undef BN_LE_PS
#undef BN_LE_PD
#undef BN_VECTOR_SELECTS
#endif

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

// Batch renorm's parameter gradients with r and d constant: y = weight * (x_hat * r + d) +
// bias gives dweight = r * sum(dy * x_hat) + d * sum(dy); dbias is unchanged. (dx is the plain
// backward's with weight * r in place of weight.)
// (d = 0, batch renorm's warm-up, adds nothing: written out, 0 x an overflowed dbias made a
// finite dweight NaN. Elsewhere r * dweight + 0 is r * dweight, the sign of a zero aside.)
template <class A>
BN_HD ParamGrads<A> renorm_param_grads(ParamGrads<A> g, Renorm<A> rd) {
  g.dweight = rd.d == A(0) ? rd.r * g.dweight : rd.r * g.dweight + rd.d * g.dbias;
  return g;
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

// Sums past A's range (float32 sums of dy * (x - mean) about 1e19 x 1e19 and more) whose
// coefficients fit give backward_coefficients an Inf mean_dy or proj (dx NaN): where those
// came out non-finite though the sums and invstd are finite, they are formed in double and
// rounded once. Callers apply it after backward_coefficients (the CPU in a loop of its own, so
// that the finalize loop stays vectorized); every other channel keeps its bits.
template <class A>
BN_HD void widen_backward_coefficients(BackwardCoefficients<A>& k, double sum_dy, double sum_dy_xmu, double n,
                                       A invstd) {
  if ((std::isfinite(k.mean_dy) && std::isfinite(k.proj)) ||
      !(std::isfinite(sum_dy) && std::isfinite(sum_dy_xmu) && std::isfinite(invstd)))
    return;
  const double s = static_cast<double>(invstd);
  k.mean_dy = static_cast<A>(sum_dy / n);
  k.proj = static_cast<A>(sum_dy_xmu / n * s * s);
}

// A sum held as s * 2^e: backward sums past double's range whose results fit (float64 dy
// about 1e198 with deviations about 1e120: sum(dy * (x - mean)) passes 1.8e308, while dweight
// = sum * invstd and proj = sum * invstd^2 / n fit). The CPU backward's rescue gives its sums
// so (cpu/backward.cpp).
struct ScaledSum {
  double s;
  int e;
};
BN_HD double scaled_value(ScaledSum a) { return std::ldexp(a.s, a.e); }

// v as m * 2^e with 0.5 <= |m| < 1 (frexp; subnormals normalized); 0, Inf and NaN as they are
// with e = 0.
struct SplitDouble {
  double m;
  int e;
};
BN_HD SplitDouble split_double(double v) {
  SplitDouble r{v, 0};
  if (std::isfinite(v) && v != 0.0) r.m = std::frexp(v, &r.e);
  return r;
}

// param_grads from scaled sums: invstd's exponent joins the sum's before the one rounding, so
// the product cannot overflow on the way.
template <class A>
BN_HD ParamGrads<A> scaled_param_grads(ScaledSum sum_dy, ScaledSum sum_dy_xmu, A invstd) {
  const SplitDouble s = split_double(static_cast<double>(invstd));
  return ParamGrads<A>{static_cast<A>(std::ldexp(sum_dy_xmu.s * s.m, sum_dy_xmu.e + s.e)),
                       static_cast<A>(scaled_value(sum_dy))};
}

// backward_coefficients' mean_dy and proj from scaled sums, as scaled_param_grads.
template <class A>
BN_HD void scaled_backward_coefficients(BackwardCoefficients<A>& k, ScaledSum sum_dy, ScaledSum sum_dy_xmu, double n,
                                        A invstd) {
  const SplitDouble s = split_double(static_cast<double>(invstd));
  k.mean_dy = static_cast<A>(std::ldexp(sum_dy.s / n, sum_dy.e));
  k.proj = static_cast<A>(std::ldexp(sum_dy_xmu.s / n * s.m * s.m, sum_dy_xmu.e + 2 * s.e));
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

// A sum (the per-group parameter gradients of ghost batch norm, added up in group order).
struct AddMap {
  static constexpr int kIn = 2;
  static constexpr int kCoef = 0;
};

template <class X>
BN_HD X apply_map(AddMap, const X*, const X* in) {
  return in[0] + in[1];
}

// ---- fold: per-channel finalize and per-element map, in double -----------------------------

// kernel' = kernel * s and bias' = (conv_bias - mean) * s + bias, i.e. normalize(conv_bias)
// with s = weight / sqrt(var + eps) (weight divided last: the fold's own rounding).
BN_HD double fold_scale(double weight, double var, double eps) { return weight / sqrt_of_sum(var, eps); }
BN_HD double fold_kernel(double v, double s) { return v * s; }
BN_HD double fold_bias(double conv_bias, double mean, double s, double bias) {
  return normalize<double>(conv_bias, mean, s, bias);
}

}  // namespace batchnorm
