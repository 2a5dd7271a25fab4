// CPU statistics: per-channel mean and biased variance (see plan.h for the reduction order).
#include "core/backend.h"
#include "cpu/params.h"
#include "cpu/plan.h"

namespace batchnorm::cpu {

void statistics(const StatisticsParams& p, const Layout& L) {
  dispatch_dtype(p.x.dtype, "x", [&](auto d) {
    using T = storage_t<decltype(d)::value>;
    using A = acc_t<T>;
    const Plan plan = make_plan<T>(L, sizeof(T));
    // Outputs in A, or in double: the moments unrounded (see StatisticsParams).
    // The output pointers by value: read through p at every channel, GCC reloaded them after
    // each store (which might alias p), a tenth of (16, 2048) statistics.
    double* const mean64 = p.mean.dtype == DType::float64 ? p.mean.ptr<double>() : nullptr;
    double* const var64 = mean64 ? p.var.ptr<double>() : nullptr;
    A* const mean_a = mean64 ? nullptr : p.mean.ptr<A>();
    A* const var_a = mean64 ? nullptr : p.var.ptr<A>();
    all_moments(kernels_for<T>(), p.x.ptr<const T>(), L, plan,
                [mean64, var64, mean_a, var_a](int64_t c, double mean, double var) {
                  if (mean64) {
                    mean64[c] = mean;
                    var64[c] = var;
                  } else {
                    mean_a[c] = static_cast<A>(mean);
                    var_a[c] = static_cast<A>(var);
                  }
                },
                [](int64_t, int64_t) {}, [](int64_t, int64_t) {});
  });
}

}  // namespace batchnorm::cpu
