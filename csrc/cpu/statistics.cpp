// CPU statistics: per-channel mean and biased variance (see plan.h for the reduction order).
#include "core/backend.h"
#include "cpu/params.h"
#include "cpu/plan.h"

namespace batchnorm::cpu {

void statistics(const StatisticsParams& p, const Layout& L) {
  dispatch_dtype(p.x.dtype, "x", [&](auto d) {
    using T = storage_t<decltype(d)::value>;
    using A = acc_t<T>;
    const Plan plan = make_plan(L, sizeof(T));
    A* mean = p.mean.ptr<A>();
    A* var = p.var.ptr<A>();
    all_moments(kernels_for<T>(), p.x.ptr<const T>(), L, plan, [&](int64_t c, const Moments<double>& m) {
      mean[c] = static_cast<A>(m.mean);
      var[c] = static_cast<A>(m.m2 / m.n);
    }, [](int64_t, int64_t) {});
  });
}

}  // namespace batchnorm::cpu
