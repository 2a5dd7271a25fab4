// CPU backward: one fused reduction per channel (sum dy, sum dy * (x - mean)), then dx from
// the shared coefficients; channel-parallel channels-first work computes dx right after the
// channel's reduction, while dy and x are still in cache. backward_reduce and backward_elemt
// are the two halves of the same passes, for sums that are added up across processes.
#include <algorithm>
#include <cmath>

#include "core/backend.h"
#include "cpu/params.h"
#include "cpu/plan.h"

namespace batchnorm::cpu {

namespace {

// Backward's per-channel partial: sum(dy) and sum(dy * (x - mean)), added in the reduce
// executor's fixed order.
struct GradSums {
  double dy = 0;
  double dy_xmu = 0;
};

// A channel's backward sums again, in double with dy and x, mean scaled by powers of two,
// when the kernels' are not finite though its dy, x and mean are: the kernels add dy * (x -
// mean) in the accumulation type, whose products and sums overflow first (float32 or bfloat16
// dy and deviations about 1e19 gave NaN parameter gradients and dx where every true result
// fits). As rescued_statistics: a channel holding a NaN or an Inf keeps the kernels' sums
// (false), found at its first non-finite row (channel_finite). x and mean share one scale, so
// that x - mean cannot overflow (float64 values near 1.8e308). The sums come back at their
// scale (`out`): past double's range (float64 dy and deviations past about 1e154) their value
// is Inf, while the parameter gradients and coefficients made from them may fit
// (scaled_param_grads, scaled_backward_coefficients).
struct ScaledGradSums {
  ScaledSum dy, dy_xmu;
};
template <class T>
[[gnu::noinline, gnu::cold]] bool rescued_grad_sums(const T* dyc, const T* xc, const Layout& L, double mean,
                                                    ScaledGradSums& out) {
  if (!std::isfinite(mean) || !channel_finite(dyc, L, 0) || !channel_finite(xc, L, 1)) return false;
  double dy_max = 0.0, x_max = std::fabs(mean);
  each_pair(dyc, xc, L, [&](double dy, double x) {
    dy_max = std::max(dy_max, std::fabs(dy));
    x_max = std::max(x_max, std::fabs(x));
  });
  const int e_dy = dy_max > 0.0 ? std::ilogb(dy_max) : 0, e_x = x_max > 0.0 ? std::ilogb(x_max) : 0;
  const double mean_scaled = std::ldexp(mean, -e_x);
  double s1 = 0.0, s2 = 0.0;
  each_pair(dyc, xc, L, [&](double dy, double x) {
    const double d = std::ldexp(dy, -e_dy);
    s1 += d;
    s2 += d * (std::ldexp(x, -e_x) - mean_scaled);
  });
  out = ScaledGradSums{ScaledSum{s1, e_dy}, ScaledSum{s2, e_dy + e_x}};
  return true;
}

// Per-channel backward sums of every channel into sum_dy[c] and sum_dy_xmu[c], then
// finalize(c0, c1) and per_block as in reduce_all. With `pre` (the fused backward's masking
// pass, whose output is dy), each range of dy is made just before it is reduced, so the
// reduction reads it from cache. Sums that overflowed are recomputed before their block's
// finalize (rescued_grad_sums; with `pre`, from the masked dy it wrote), found by a vectorized
// test over the block (a test per channel in per_channel had made (16, 2048) backward 1.3x).
// Rescued sums whose value passes double's range are taken once more after the finalize and
// handed to `past_range(c, sums)` at their scale, to mend what the finalize made of them. (That
// second look reads dy before the block's dx pass: reduce_all runs per_block after finalize.)
template <class T, class Fin, class Past, class B>
bool all_grad_sums(const Kernels<T>& k, const T* dy, const T* x, const Layout& L, const Plan& plan,
                   const acc_t<T>* mean, const MapPass<T>* pre, double* sum_dy, double* sum_dy_xmu, Fin&& finalize,
                   Past&& past_range, B&& per_block) {
  const int64_t C = L.channels;
  const int64_t cs_dy = L.channel_stride[0], cs_x = L.channel_stride[1];
  buffer<acc_t<T>> plane_mean;  // tiny planes: the mean of each plane value's channel
  if (plan.plane) spread_over_planes(&mean, 1, C, plan.plane, plane_mean);
  const acc_t<T>* cl_mean = plan.plane ? plane_mean.data() : mean;
  return reduce_all<GradSums>(
      L, plan, (pre ? 5 : 2) * L.count * C,
      [&](int64_t c, int64_t b, int64_t e) {
        if (pre) map_channel_range(k, *pre, L, c, c + 1, b, e);
        GradSums s;
        k.grad_sums(dy + c * cs_dy, x + c * cs_x, L, b, e, mean[c], &s.dy, &s.dy_xmu);
        return s;
      },
      [&](int64_t c0, int64_t n, int64_t b, int64_t e, GradSums* out) {
        if (pre) map_channel_range(k, *pre, L, c0, c0 + n, b, e);
        double s1[kBlockChannels], s2[kBlockChannels];
        k.grad_sums_channels(dy + c0 * cs_dy, x + c0 * cs_x, L, n, b, e, mean + c0, s1, s2);
        for (int64_t i = 0; i < n; ++i) out[i] = GradSums{s1[i], s2[i]};
      },
      [&](const Layout& R, int64_t c0, int64_t b, int64_t e, GradSums* out) {
        if (pre) {
          const MapPass<T> r = channels_from(*pre, pre->coef, c0);
          k.cl_map[static_cast<int>(pre->kind)](r.in, r.out, R, b, e, r.coef, pre->nt);
        }
        const int64_t n = R.channels;
        scratch_array<acc_t<T>> scratch(static_cast<size_t>(3 * n));  // both written before read
        scratch_array<double> s(static_cast<size_t>(2 * n));
        k.cl_grad_sums(dy + c0, x + c0, R, b, e, cl_mean + c0, s.data(), s.data() + n, scratch.data());
        for (int64_t c = 0; c < n; ++c) out[c] = GradSums{s[c], s[n + c]};
      },
      [](const GradSums& a, const GradSums& b) { return GradSums{a.dy + b.dy, a.dy_xmu + b.dy_xmu}; },
      [&](int64_t c, const GradSums& s) {
        sum_dy[c] = s.dy;
        sum_dy_xmu[c] = s.dy_xmu;
      },
      [&](int64_t c0, int64_t c1) {
        auto rescue = [&](int64_t c, ScaledGradSums& r) {
          return rescued_grad_sums(dy + c * cs_dy, x + c * cs_x, L, static_cast<double>(mean[c]), r);
        };
        bool past = false;
        if (!(all_finite(sum_dy + c0, c1 - c0) && all_finite(sum_dy_xmu + c0, c1 - c0))) [[unlikely]]
          for (int64_t c = c0; c < c1; ++c) {
            ScaledGradSums r;
            if ((std::isfinite(sum_dy[c]) && std::isfinite(sum_dy_xmu[c])) || !rescue(c, r)) continue;
            sum_dy[c] = scaled_value(r.dy);
            sum_dy_xmu[c] = scaled_value(r.dy_xmu);
            past = past || !(std::isfinite(sum_dy[c]) && std::isfinite(sum_dy_xmu[c]));
          }
        finalize(c0, c1);
        if (past) [[unlikely]]
          for (int64_t c = c0; c < c1; ++c) {
            ScaledGradSums r;
            if (!(std::isfinite(sum_dy[c]) && std::isfinite(sum_dy_xmu[c])) && rescue(c, r)) past_range(c, r);
          }
      },
      per_block);
}

// Per-channel coefficients of backward_dx, held as the (C,) arrays the dx pass reads.
template <class T>
struct DxCoefficients {
  using A = acc_t<T>;
  scratch_array<A> mean, scale, mean_dy, proj;  // every channel written by finalize before the pass
  explicit DxCoefficients(int64_t C) : mean(C), scale(C), mean_dy(C), proj(C) {}
  // Channels [c0, c1) from their sums (kernels/finalize.h), with their parameter gradients
  // into dweight[0, c1 - c0), dbias[0, c1 - c0).
  void finalize(const Kernels<T>& k, int64_t c0, int64_t c1, const double* sum_dy, const double* sum_dy_xmu,
                double count, const A* mean_in, const A* invstd, const A* weight, A* dweight, A* dbias) {
    k.backward_finalize(c1 - c0, sum_dy + c0, sum_dy_xmu + c0, count, mean_in + c0, invstd + c0, weight + c0,
                        dweight, dbias, mean.data() + c0, scale.data() + c0, mean_dy.data() + c0, proj.data() + c0);
  }
  // The elementwise pass dx = backward_dx(dy, x) over the layout (dy, x, dx).
  MapPass<T> pass(const T* dy, const T* x, T* dx, bool nt) const {
    MapPass<T> m;
    m.kind = MapKind::backward_dx;
    m.in[0] = dy;
    m.in[1] = x;
    m.out = dx;
    m.coef[0] = mean.data();
    m.coef[1] = scale.data();
    m.coef[2] = mean_dy.data();
    m.coef[3] = proj.data();
    m.nt = nt;
    return m;
  }
};

}  // namespace

void backward(const BackwardParams& p, const Layout& L) {
  dispatch_dtype(p.x.dtype, "x", [&](auto d) {
    using T = storage_t<decltype(d)::value>;
    using A = acc_t<T>;
    const Kernels<T>& k = kernels_for<T>();
    const int64_t C = L.channels;
    // Fused (core/backend.h): the masking pass of split_masked_backward, made range by range
    // ahead of the reduction, which reads its output as dy; one layout walks all arrays.
    const bool masked = p.activation == Activation::relu || p.dresidual.defined();
    const Plan plan = make_plan<T>(L, (masked ? 5 : 3) * sizeof(T));
    const scratch_array<A> mean = load_vector<A>(p.saved_mean, C, A(0));
    const scratch_array<A> invstd = load_vector<A>(p.saved_invstd, C, A(1));
    scratch_array<A> weight = load_vector<A>(p.weight, C, A(1));
    // Batch renorm: r and d are constants; dx is the plain one with weight * r.
    const bool renorm = p.renorm_r.defined();
    const scratch_array<A> r = renorm ? load_vector<A>(p.renorm_r, C, A(1)) : scratch_array<A>();
    const scratch_array<A> rd = renorm ? load_vector<A>(p.renorm_d, C, A(0)) : scratch_array<A>();
    if (renorm)
      for (int64_t c = 0; c < C; ++c) weight[c] = weight[c] * r[c];
    T* dx = p.dx.ptr<T>();
    // Regular stores: read back at once by the reduction.
    const MapPass<T> mask = masked ? elementwise_pass<T>(split_masked_backward(p).mask) : MapPass<T>{};
    const T* dy = masked ? mask.out : p.dy.ptr<const T>();
    const T* x = p.x.ptr<const T>();
    A* dweight = p.dweight.ptr<A>();
    A* dbias = p.dbias.ptr<A>();
    // Streamed dx where the op's distinct arrays cannot stay in the cache (out=dy counts once),
    // and never over the masked gradient it holds without dresidual: those lines are dirty in
    // cache by then, and a streamed store writes each back first. 32x64x56x56 float32, Xeon, 2
    // threads: out=dy 2.7 -> 1.3 ms, the ReLU backward without residual 6.7 -> 3.6 ms.
    const void* distinct[5] = {};
    int n_distinct = 0;
    for (const TensorView* t : {&p.dy, &p.x, &p.dx, &p.y, &p.dresidual})
      if (t->defined() && (t != &p.y || p.activation == Activation::relu) &&
          std::find(distinct, distinct + n_distinct, t->data) == distinct + n_distinct)
        distinct[n_distinct++] = t->data;
    const bool nt = !(masked && mask.out == dx) &&
                    stream_rereads(n_distinct * L.count * C * static_cast<int64_t>(sizeof(T)));
    DxCoefficients<T> coef(C);
    const MapPass<T> pass = coef.pass(dy, x, dx, nt);
    scratch_array<double> sum_dy(static_cast<size_t>(C)), sum_dy_xmu(static_cast<size_t>(C));  // per_channel's
    const bool fused = all_grad_sums(
        k, dy, x, L, plan, mean.data(), masked ? &mask : nullptr, sum_dy.data(), sum_dy_xmu.data(),
        [&](int64_t c0, int64_t c1) {
          coef.finalize(k, c0, c1, sum_dy.data(), sum_dy_xmu.data(), static_cast<double>(L.count), mean.data(),
                        invstd.data(), weight.data(), dweight + c0, dbias + c0);
          for (int64_t c = c0; c < c1 && renorm; ++c) {
            const ParamGrads<A> g = renorm_param_grads<A>(ParamGrads<A>{dweight[c], dbias[c]}, Renorm<A>{r[c], rd[c]});
            dweight[c] = g.dweight;
            dbias[c] = g.dbias;
          }
        },
        [&](int64_t c, const ScaledGradSums& s) {
          ParamGrads<A> g = scaled_param_grads<A>(s.dy, s.dy_xmu, invstd[c]);
          if (renorm) g = renorm_param_grads<A>(g, Renorm<A>{r[c], rd[c]});
          dweight[c] = g.dweight;
          dbias[c] = g.dbias;
          BackwardCoefficients<A> kc{};
          scaled_backward_coefficients<A>(kc, s.dy, s.dy_xmu, static_cast<double>(L.count), invstd[c]);
          coef.mean_dy[c] = kc.mean_dy;
          coef.proj[c] = kc.proj;
        },
        [&](int64_t c0, int64_t c1) { map_channels(k, pass, L, plan, c0, c1); });
    if (!fused) map_all(k, pass, L, plan);
  });
}

void backward_reduce(const BackwardReduceParams& p, const Layout& L) {
  dispatch_dtype(p.x.dtype, "x", [&](auto d) {
    using T = storage_t<decltype(d)::value>;
    using A = acc_t<T>;
    const int64_t C = L.channels;
    double* sum_dy = p.sum_dy.ptr<double>();
    double* sum_dy_xmu = p.sum_dy_xmu.ptr<double>();
    A* dweight = p.dweight.ptr<A>();
    A* dbias = p.dbias.ptr<A>();
    const scratch_array<A> invstd = load_vector<A>(p.invstd, C, A(1));
    auto param_grads_of = [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const ParamGrads<A> g = param_grads<A>(sum_dy[c], sum_dy_xmu[c], invstd[c]);
        dweight[c] = g.dweight;
        dbias[c] = g.dbias;
      }
    };
    // An empty shard contributes zero sums and zero parameter gradients, whatever invstd
    // holds (the formula's 0 x an Inf invstd was NaN); CUDA memsets the same zeros.
    if (L.count == 0) {
      std::fill(sum_dy, sum_dy + C, 0.0);
      std::fill(sum_dy_xmu, sum_dy_xmu + C, 0.0);
      std::fill(dweight, dweight + C, A(0));
      std::fill(dbias, dbias + C, A(0));
      return;
    }
    const scratch_array<A> mean = load_vector<A>(p.mean, C, A(0));
    all_grad_sums(kernels_for<T>(), p.dy.ptr<const T>(), p.x.ptr<const T>(), L, make_plan<T>(L, 3 * sizeof(T)),
                  mean.data(), static_cast<const MapPass<T>*>(nullptr), sum_dy, sum_dy_xmu, param_grads_of,
                  [&](int64_t c, const ScaledGradSums& s) {  // the sum_dy_xmu output stays Inf
                    dweight[c] = scaled_param_grads<A>(s.dy, s.dy_xmu, invstd[c]).dweight;
                  },
                  [](int64_t, int64_t) {});
  });
}

void backward_elemt(const BackwardElemtParams& p, const Layout& L) {
  dispatch_dtype(p.x.dtype, "x", [&](auto d) {
    using T = storage_t<decltype(d)::value>;
    using A = acc_t<T>;
    const int64_t C = L.channels;
    const scratch_array<A> mean = load_vector<A>(p.mean, C, A(0));
    const scratch_array<A> invstd = load_vector<A>(p.invstd, C, A(1));
    const scratch_array<A> weight = load_vector<A>(p.weight, C, A(1));
    const scratch_array<double> sum_dy = load_vector<double>(p.sum_dy, C, 0.0);
    const scratch_array<double> sum_dy_xmu = load_vector<double>(p.sum_dy_xmu, C, 0.0);
    DxCoefficients<T> coef(C);
    for_channels(C, 8, [&](int64_t c0, int64_t c1) {
      A dweight[kParamBlock], dbias[kParamBlock];  // backward_reduce's, not needed here
      coef.finalize(kernels_for<T>(), c0, c1, sum_dy.data(), sum_dy_xmu.data(), static_cast<double>(p.count),
                    mean.data(), invstd.data(), weight.data(), dweight, dbias);
    });
    // dy and x are taken to have just been read by backward_reduce (stream_rereads).
    const Plan plan = make_plan<T>(L, 3 * sizeof(T), /*rereads=*/true);
    map_all(kernels_for<T>(), coef.pass(p.dy.ptr<const T>(), p.x.ptr<const T>(), p.dx.ptr<T>(), plan.from_memory),
            L, plan);
  });
}

}  // namespace batchnorm::cpu
