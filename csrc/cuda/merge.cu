// CUDA merge_statistics: per channel, the core's overflow-safe Chan merge of the shards'
// (count, mean, var) in shard order (merge_shard), in double, one thread per channel. Shard
// descriptors travel as kernel arguments, kShards per launch (no host-to-device copy); between
// launches the scaled moments wait in a double workspace.
#include "core/backend.h"
#include "core/recipes.h"
#include "cuda/common.cuh"
#include "cuda/convert.cuh"

namespace batchnorm::cuda {

namespace {

constexpr int kShards = 32;  // 32 * 56 bytes of descriptors: well inside the 4 KB of arguments

struct ShardBatch {
  ParamRef mean[kShards];
  ParamRef var[kShards];
  double count[kShards];
  int size = 0;
};

// acc_in == nullptr: start from nothing; out_mean == nullptr: leave the moments in acc_out.
__global__ void __launch_bounds__(kBlock)
    merge_kernel(int64_t channels, const __grid_constant__ ShardBatch batch, const ScaledMoments* acc_in,
                 ScaledMoments* acc_out, ParamRef out_mean, ParamRef out_var) {
  for (int64_t c = int64_t(blockIdx.x) * kBlock + threadIdx.x; c < channels; c += int64_t(gridDim.x) * kBlock) {
    ScaledMoments m = acc_in ? acc_in[c] : ScaledMoments{};
    for (int s = 0; s < batch.size; ++s) {
      m = merge_shard(m, batch.count[s], load_param(batch.mean[s], c, 0.0), load_param(batch.var[s], c, 0.0));
    }
    if (out_mean.data) {
      store_param(out_mean, c, merged_mean(m));
      store_param(out_var, c, merged_variance(m));
    } else {
      acc_out[c] = m;
    }
  }
}

}  // namespace

void merge_statistics(const MergeStatisticsParams& p) {
  const Device device = p.means[0].device;
  DeviceGuard guard(device.index);
  const cudaStream_t stream = to_stream(p.exec.stream);
  const int64_t C = p.mean.shape[0];
  std::vector<size_t> shards;  // those with values, in order
  for (size_t s = 0; s < p.means.size(); ++s)
    if (p.counts[s] > 0) shards.push_back(s);
  Workspace ws(device.index, stream, p.exec.scratch);
  ScaledMoments* acc = shards.size() > kShards ? ws.alloc<ScaledMoments>(C) : nullptr;
  for (size_t first = 0; first < shards.size(); first += kShards) {
    ShardBatch batch;
    for (size_t k = first; k < shards.size() && batch.size < kShards; ++k, ++batch.size) {
      batch.mean[batch.size] = param_ref(p.means[shards[k]]);
      batch.var[batch.size] = param_ref(p.vars[shards[k]]);
      batch.count[batch.size] = static_cast<double>(p.counts[shards[k]]);
    }
    const bool last = first + kShards >= shards.size();
    merge_kernel<<<grid_for(ceil_div(C, kBlock)), kBlock, 0, stream>>>(
        C, batch, first == 0 ? nullptr : acc, acc, last ? param_ref(p.mean) : ParamRef{},
        last ? param_ref(p.var) : ParamRef{});
    BN_CUDA_CHECK_LAUNCH("merge_kernel");
  }
}

}  // namespace batchnorm::cuda
