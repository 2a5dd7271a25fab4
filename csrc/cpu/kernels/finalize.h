// The per-channel finalize of the forward and backward over arrays of channels: the scalar
// formulas of core/recipes.h applied element by element in plain loops, which the compiler
// vectorizes for each ISA level. Square roots, divisions and conversions round the same in a
// vector lane as in a scalar register (no contraction: -ffp-contract=off), so every level gives
// the bits of the scalar formulas.
#pragma once
#include <cstdint>

#include "core/recipes.h"
#include "cpu/convert.h"

namespace batchnorm::cpu::BN_ISA {

// forward_coefficients of n channels: mean[i] and var[i] (the batch's, in double) with
// weight[i], bias[i] to the normalize's mean, invstd, scale and shift. Called once per channel
// from the reduction's merge, the square root and division of each channel waited on the one
// before: (16, 1024) float32 training spent 16% of its time there (AMD EPYC, 1 thread).
template <class T>
void forward_finalize(int64_t n, const double* __restrict mean, const double* __restrict var, double eps,
                      const acc_t<T>* __restrict weight, const acc_t<T>* __restrict bias, acc_t<T>* __restrict mean_out,
                      acc_t<T>* __restrict invstd, acc_t<T>* __restrict scale, acc_t<T>* __restrict shift) {
  using A = acc_t<T>;
  int64_t overflowed = 0;  // (a count, which the vectorized loop keeps in lanes)
  for (int64_t i = 0; i < n; ++i) {
    const ForwardCoefficients<A> k = forward_coefficients<A>(mean[i], var[i], eps, weight[i], bias[i]);
    mean_out[i] = k.mean;
    invstd[i] = k.invstd;
    scale[i] = k.scale;
    shift[i] = k.shift;
    overflowed += forward_coefficients_overflowed(k);
  }
  // Coefficients that overflowed are mended by a loop of their own (widen_forward_coefficients).
  if (overflowed == 0) [[likely]]
    return;
  for (int64_t i = 0; i < n; ++i) {
    ForwardCoefficients<A> k{mean_out[i], invstd[i], scale[i], shift[i]};
    if (!forward_coefficients_overflowed(k)) continue;
    widen_forward_coefficients<A>(k, var[i], eps, weight[i]);
    invstd[i] = k.invstd;
    scale[i] = k.scale;
  }
}

// param_grads and backward_coefficients of n channels from their sums (in double) over
// `count` values each.
template <class T>
void backward_finalize(int64_t n, const double* __restrict sum_dy, const double* __restrict sum_dy_xmu, double count,
                       const acc_t<T>* __restrict mean, const acc_t<T>* __restrict invstd,
                       const acc_t<T>* __restrict weight, acc_t<T>* __restrict dweight, acc_t<T>* __restrict dbias,
                       acc_t<T>* __restrict k_mean, acc_t<T>* __restrict k_scale, acc_t<T>* __restrict k_mean_dy,
                       acc_t<T>* __restrict k_proj) {
  using A = acc_t<T>;
  for (int64_t i = 0; i < n; ++i) {
    const ParamGrads<A> g = param_grads<A>(sum_dy[i], sum_dy_xmu[i], invstd[i]);
    dweight[i] = g.dweight;
    dbias[i] = g.dbias;
    const BackwardCoefficients<A> k =
        backward_coefficients<A>(sum_dy[i], sum_dy_xmu[i], count, mean[i], invstd[i], weight[i]);
    k_mean[i] = k.mean;
    k_scale[i] = k.scale;
    k_mean_dy[i] = k.mean_dy;
    k_proj[i] = k.proj;
  }
  // Coefficients that overflowed A (widen_backward_coefficients), found by a loop of their own:
  // its test inside the loop above kept GCC from vectorizing it.
  if (all_finite(k_mean_dy, n) && all_finite(k_proj, n)) [[likely]]
    return;
  for (int64_t i = 0; i < n; ++i) {
    BackwardCoefficients<A> k{k_mean[i], k_scale[i], k_mean_dy[i], k_proj[i]};
    widen_backward_coefficients<A>(k, sum_dy[i], sum_dy_xmu[i], count, invstd[i]);
    k_mean_dy[i] = k.mean_dy;
    k_proj[i] = k.proj;
  }
}

}  // namespace batchnorm::cpu::BN_ISA
