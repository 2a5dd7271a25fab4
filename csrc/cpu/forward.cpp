// CPU forward passes: training (batch statistics, normalize, running-statistics update) and
// inference (given statistics), plain or fused with a residual add and a ReLU. Channels-first
// channel-parallel training normalizes each channel right after its reduction, while the
// channel is still in cache.

#include <algorithm>

#include "core/backend.h"
#include "cpu/params.h"
#include "cpu/plan.h"

namespace batchnorm::cpu {

namespace {

// The forward's elementwise pass: y = act(normalize(x) + residual) with per-channel (C,)
// coefficient arrays; the recipe follows from the params.
template <class T, class P>
MapPass<T> forward_pass(const P& p, const acc_t<T>* mean, const acc_t<T>* scale, const acc_t<T>* shift, bool nt) {
  MapPass<T> m;
  const bool relu = p.activation == Activation::relu;
  m.kind = p.residual.defined() ? (relu ? MapKind::normalize_add_relu : MapKind::normalize_add)
                                : (relu ? MapKind::normalize_relu : MapKind::normalize);
  m.in[0] = p.x.template ptr<const T>();
  m.in[1] = p.residual.defined() ? p.residual.template ptr<const T>() : nullptr;
  m.out = p.y.template ptr<T>();
  m.coef[0] = mean;
  m.coef[1] = scale;
  m.coef[2] = shift;
  m.nt = nt;
  m.memory_order = true;
  return m;
}

// Bytes per value of every array the forward reads or writes (x, the residual, y).
template <class T, class P>
int64_t forward_bytes(const P& p) {
  return (p.residual.defined() ? 3 : 2) * static_cast<int64_t>(sizeof(T));
}

}  // namespace

void forward_training(const ForwardTrainingParams& p, const Layout& L) {
  dispatch_dtype(p.x.dtype, "x", [&](auto d) {
    using T = storage_t<decltype(d)::value>;
    using A = acc_t<T>;
    const Kernels<T>& k = kernels_for<T>();
    const int64_t C = L.channels;
    // x is taken to have just been reduced: by this op, or, with batch statistics given
    // (SyncBatchNorm's split), by the statistics op that made this process's part of them
    // (stream_rereads; a caller that does otherwise streams at half the threshold).
    const Plan plan = make_plan<T>(L, forward_bytes<T>(p), /*rereads=*/true);
    const scratch_array<A> weight = load_vector<A>(p.weight, C, A(1));
    const scratch_array<A> bias = load_vector<A>(p.bias, C, A(0));
    // The batch mean and biased variance as given, or written by per_channel before they are read.
    const bool given = p.batch_mean.defined();
    scratch_array<double> batch_mean = given ? load_vector<double>(p.batch_mean, C, 0.0) : scratch_array<double>(C);
    scratch_array<double> batch_var = given ? load_vector<double>(p.batch_var, C, 0.0) : scratch_array<double>(C);
    scratch_array<A> scale(static_cast<size_t>(C)), shift(static_cast<size_t>(C));
    A* mean = p.saved_mean.ptr<A>();
    A* invstd = p.saved_invstd.ptr<A>();
    // The running statistics as they were before this step (batch renorm reads them).
    scratch_array<double> rm, rv;
    if (p.running_mean.defined()) {
      rm = load_vector<double>(p.running_mean, C, 0.0);
      rv = load_vector<double>(p.running_var, C, 0.0);
    }
    const MapPass<T> pass =
        forward_pass<T>(p, mean, scale.data(), shift.data(), plan.from_memory);
    // The coefficients of channels [c0, c1) from their batch mean and biased variance (in
    // double, from x or as given), over arrays (kernels/finalize.h).
    auto finalize = [&](int64_t c0, int64_t c1) {
      k.forward_finalize(c1 - c0, batch_mean.data() + c0, batch_var.data() + c0, p.eps, weight.data() + c0,
                         bias.data() + c0, mean + c0, invstd + c0, scale.data() + c0, shift.data() + c0);
      for (int64_t c = c0; c < c1 && p.renorm; ++c) {
        const Renorm<A> rd = renorm_correction<A>(batch_mean[c], batch_var[c], rm[c], rv[c], p.eps, p.renorm_rmax,
                                                  p.renorm_dmax);
        ForwardCoefficients<A> f{mean[c], invstd[c], scale[c], shift[c]};
        renormalize(f, rd, weight[c], bias[c]);
        scale[c] = f.scale;
        shift[c] = f.shift;
        p.renorm_r.ptr<A>()[c] = rd.r;
        p.renorm_d.ptr<A>()[c] = rd.d;
      }
      if (p.moments_mean.defined()) {
        std::copy(batch_mean.data() + c0, batch_mean.data() + c1, p.moments_mean.ptr<double>() + c0);
        std::copy(batch_var.data() + c0, batch_var.data() + c1, p.moments_var.ptr<double>() + c0);
      }
    };
    bool fused = false;
    if (given) {
      finalize(0, C);
    } else {
      fused = all_moments(
          k, pass.in[0], L, plan,
          [&](int64_t c, double mean, double var) {
            batch_mean[c] = mean;
            batch_var[c] = var;
          },
          finalize, [&](int64_t c0, int64_t c1) { map_channels(k, pass, L, plan, c0, c1); });
    }
    if (!fused && L.count > 0) map_all(k, pass, L, plan);
    if (p.running_mean.defined()) {
      const double n = static_cast<double>(given ? p.batch_count : L.count);
      const RunningOptions o{p.running_var_unbiased, p.skip_nonfinite, dtype_overflow(p.running_mean.dtype),
                             dtype_overflow(p.running_var.dtype)};
      // The loop's invariants by value and the plain update (no skip) a loop of its own: read
      // through references, GCC reloaded the options and the momentum at every channel (the
      // stores to rm and rv might alias them) and tested skip_nonfinite there.
      const double momentum = p.momentum;
      double* const run_mean = rm.data();
      double* const run_var = rv.data();
      const double* const var = batch_var.data();
      for_channels(C, 4, [&, n, o, momentum, run_mean, run_var, var, mean](int64_t c0, int64_t c1) {
        // Locals, not the closure's members, which the stores to run_mean and run_var may
        // alias: GCC reloaded the momentum from the closure at every channel.
        const double count = n, rate = momentum;
        const RunningOptions opts = o;
        double* const rmean = run_mean;
        double* const rvar = run_var;
        if (opts.skip_nonfinite) {
          for (int64_t c = c0; c < c1; ++c) update_running<A>(rmean[c], rvar[c], mean[c], var[c], count, rate, opts);
        } else {
          const RunningOptions plain{opts.unbiased};
          for (int64_t c = c0; c < c1; ++c) update_running<A>(rmean[c], rvar[c], mean[c], var[c], count, rate, plain);
        }
        store_range(p.running_mean, c0, c1 - c0, rm.data() + c0);
        store_range(p.running_var, c0, c1 - c0, rv.data() + c0);
      });
    }
  });
}

void forward_inference(const ForwardInferenceParams& p, const Layout& L) {
  dispatch_dtype(p.x.dtype, "x", [&](auto d) {
    using T = storage_t<decltype(d)::value>;
    using A = acc_t<T>;
    const int64_t C = L.channels;
    const Kernels<T>& k = kernels_for<T>();
    scratch_array<A> mean(static_cast<size_t>(C)), scale(static_cast<size_t>(C)), shift(static_cast<size_t>(C));
    for_channels(C, 8, [&](int64_t c0, int64_t c1) {
      const int64_t n = c1 - c0;
      double var[kParamBlock], given_mean[kParamBlock];
      A weight[kParamBlock], bias[kParamBlock], invstd[kParamBlock];
      load_range(p.var, c0, n, 1.0, var);
      load_range(p.mean, c0, n, 0.0, given_mean);
      load_range(p.weight, c0, n, A(1), weight);
      load_range(p.bias, c0, n, A(0), bias);
      k.forward_finalize(n, given_mean, var, p.eps, weight, bias, mean.data() + c0, invstd, scale.data() + c0,
                         shift.data() + c0);
    });
    const Plan plan = make_plan<T>(L, forward_bytes<T>(p));
    map_all(k, forward_pass<T>(p, mean.data(), scale.data(), shift.data(), plan.from_memory), L, plan);
  });
}

}  // namespace batchnorm::cpu
