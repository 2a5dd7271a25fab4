// (Parameter loading is header-only; see params.h.) merge_statistics lives here: it works on
// per-channel vectors only, so it is the parameter code's one op.
#include "core/backend.h"
#include "core/recipes.h"
#include "cpu/params.h"

namespace batchnorm::cpu {

void merge_statistics(const MergeStatisticsParams& p) {
  const int64_t C = p.mean.shape[0];
  buffer<ScaledMoments> acc(static_cast<size_t>(C));
  for (size_t s = 0; s < p.means.size(); ++s) {
    if (p.counts[s] == 0) continue;
    const double n = static_cast<double>(p.counts[s]);
    const scratch_array<double> m = load_vector<double>(p.means[s], C, 0.0);
    const scratch_array<double> v = load_vector<double>(p.vars[s], C, 0.0);
    for (int64_t c = 0; c < C; ++c) acc[c] = merge_shard(acc[c], n, m[c], v[c]);
  }
  for (int64_t c = 0; c < C; ++c) {
    store_any(p.mean.data, p.mean.dtype, c, merged_mean(acc[c]));
    store_any(p.var.data, p.var.dtype, c, merged_variance(acc[c]));
  }
}

}  // namespace batchnorm::cpu
