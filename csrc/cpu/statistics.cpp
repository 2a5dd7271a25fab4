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
    const bool wide = p.mean.dtype == DType::float64;
    all_moments(kernels_for<T>(), p.x.ptr<const T>(), L, plan, [&](int64_t c, double mean, double var) {
      if (wide) {
        p.mean.ptr<double>()[c] = mean;
        p.var.ptr<double>()[c] = var;
      } else {
        p.mean.ptr<A>()[c] = static_cast<A>(mean);
        p.var.ptr<A>()[c] = static_cast<A>(var);
      }
    }, [](int64_t, int64_t) {}, [](int64_t, int64_t) {});
  });
}

}  // namespace batchnorm::cpu
