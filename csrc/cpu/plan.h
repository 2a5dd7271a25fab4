// How a CPU op cuts its work: fixed groups of every reduction, chosen from the shape alone
// (so the merge order, and the bits, never depend on the thread count), and whether each
// thread takes whole channels (statistics and normalize back to back while the channel is
// in cache) or groups of one channel (few channels, many threads).
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "core/layout.h"
#include "cpu/kernels.h"
#include "cpu/threads.h"

namespace batchnorm::cpu {

// Bytes of the last-level cache, from the OS (32 MiB when it does not say).
int64_t last_level_cache_bytes();

// Whether an op touching `bytes` of memory should write its output with non-temporal
// stores: when its data cannot stay in the last-level cache anyway.
inline bool stream_output(int64_t bytes) { return bytes > last_level_cache_bytes(); }

struct Plan {
  bool channels_last = false;
  int64_t groups = 1;   // channels-first: groups per channel; channels-last: groups of positions
  int64_t pieces = 1;   // channels-first: kPiece blocks per channel
  int64_t count = 0;
  bool channel_parallel = true;  // channels-first: one task per channel

  // Channels-first: values [begin, end) of group g of a channel (piece aligned).
  // Channels-last: positions [begin, end) of group g.
  std::pair<int64_t, int64_t> range(int64_t g) const {
    if (channels_last) return {count * g / groups, count * (g + 1) / groups};
    const int64_t pb = pieces * g / groups, pe = pieces * (g + 1) / groups;
    return {pb * kPiece, std::min(count, pe * kPiece)};
  }
};

inline Plan make_plan(const Layout& L) {
  Plan p;
  p.count = L.count;
  p.channels_last = L.channels_last();
  if (p.channels_last) {
    p.groups = std::clamp<int64_t>((L.count + kChannelsLastMinGroup - 1) / kChannelsLastMinGroup, 1, kMaxGroups);
  } else {
    p.pieces = std::max<int64_t>(1, (L.count + kPiece - 1) / kPiece);
    p.groups = std::min(p.pieces, kMaxGroups);
    const int64_t T = thread_count();
    const int64_t C = L.channels;
    p.channel_parallel = T == 1 || C >= 4 * T || (C >= T && C % T == 0) || p.groups == 1;
  }
  return p;
}

// Moments of group g of one channel (channels-first): its pieces merged in order.
template <class T>
Moments<double> group_moments(const Kernels<T>& k, const T* xc, const Layout& L, const Plan& plan, int64_t g) {
  const auto [b, e] = plan.range(g);
  Moments<double> m;
  for (int64_t s = b; s < e; s += kPiece) m = merge_moments(m, k.moments(xc, L, s, std::min(e, s + kPiece)));
  return m;
}

// Moments of one whole channel (channels-first): its groups merged in order.
template <class T>
Moments<double> channel_moments(const Kernels<T>& k, const T* xc, const Layout& L, const Plan& plan) {
  Moments<double> m;
  for (int64_t g = 0; g < plan.groups; ++g) m = merge_moments(m, group_moments(k, xc, L, plan, g));
  return m;
}

// Per-channel moments of x, whichever the layout; `per_channel(c, m)` is called for each
// channel once its moments are final, on the thread that finished them (channels-first,
// channel-parallel: right after that channel's reduction, while it is in cache).
template <class T, class F>
void all_moments(const Kernels<T>& k, const T* x, const Layout& L, const Plan& plan, F&& per_channel) {
  const int64_t C = L.channels;
  const int64_t work = L.count * C;
  if (plan.channels_last) {
    std::vector<Moments<double>> partial(static_cast<size_t>(plan.groups * C));
    parallel_for(plan.groups, work, [&](int64_t g) {
      std::vector<acc_t<T>> scratch(static_cast<size_t>(2 * C));
      const auto [b, e] = plan.range(g);
      k.cl_moments(x, L, b, e, partial.data() + g * C, scratch.data());
    });
    parallel_for(C, C * plan.groups * 8, [&](int64_t c) {
      Moments<double> m;
      for (int64_t g = 0; g < plan.groups; ++g) m = merge_moments(m, partial[g * C + c]);
      per_channel(c, m);
    });
  } else if (plan.channel_parallel) {
    parallel_for(C, work, [&](int64_t c) { per_channel(c, channel_moments(k, x + c * L.channel_stride[0], L, plan)); });
  } else {
    std::vector<Moments<double>> partial(static_cast<size_t>(plan.groups * C));
    parallel_for(C * plan.groups, work, [&](int64_t i) {
      const int64_t c = i / plan.groups, g = i % plan.groups;
      partial[i] = group_moments(k, x + c * L.channel_stride[0], L, plan, g);
    });
    for (int64_t c = 0; c < C; ++c) {
      Moments<double> m;
      for (int64_t g = 0; g < plan.groups; ++g) m = merge_moments(m, partial[c * plan.groups + g]);
      per_channel(c, m);
    }
  }
}

}  // namespace batchnorm::cpu
