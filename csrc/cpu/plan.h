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

// Bytes of the last-level cache and of one core's L2, from the OS (32 MiB and 1 MiB when it
// does not say).
int64_t last_level_cache_bytes();
int64_t l2_cache_bytes();

// Bytes above which outputs are written with non-temporal stores: the last-level cache size,
// unless BATCHNORM_STREAM_BYTES or set_stream_threshold_bytes (tests) says otherwise.
int64_t stream_threshold_bytes();
int64_t stream_threshold_from_env();  // -1 when unset; ValueError when malformed
void set_stream_threshold(int64_t bytes);  // < 0: back to the default

// Whether an op touching `bytes` of memory should write its output with non-temporal
// stores: when its data cannot stay in the last-level cache anyway.
inline bool stream_output(int64_t bytes) { return bytes > stream_threshold_bytes(); }

struct Plan {
  bool channels_last = false;
  int64_t groups = 1;   // channels-first: groups per channel; channels-last: groups of positions
  int64_t pieces = 1;   // channels-first: kPiece blocks per channel
  int64_t count = 0;
  bool channel_parallel = true;  // channels-first: one task per block of channels
  int64_t channel_block = 1;     // channels-first, channel-parallel: channels per task

  int64_t channel_blocks(int64_t C) const { return (C + channel_block - 1) / channel_block; }

  // Channels-first: values [begin, end) of group g of a channel (piece aligned).
  // Channels-last: positions [begin, end) of group g.
  std::pair<int64_t, int64_t> range(int64_t g) const {
    if (channels_last) return {count * g / groups, count * (g + 1) / groups};
    const int64_t pb = pieces * g / groups, pe = pieces * (g + 1) / groups;
    return {pb * kPiece, std::min(count, pe * kPiece)};
  }
};

// bytes_per_value: bytes of every array the op reads or writes, per value (2 * sizeof(T) for a
// forward pass, 3 * sizeof(T) for backward); sizes the channel blocks so that one block's data
// stays in L2 between its reduction and its elementwise pass.
inline Plan make_plan(const Layout& L, int64_t bytes_per_value = 8) {
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
    if (p.channel_parallel) {
      // Channels next to each other in memory (NCHW with small planes) are walked piece by
      // piece together, so each task streams through contiguous memory; the block stays small
      // enough to be re-read from L2, and there are enough blocks for every thread.
      const int64_t channel_bytes = std::max<int64_t>(1, L.count * bytes_per_value);
      const int64_t fit = std::max<int64_t>(1, l2_cache_bytes() / 2 / channel_bytes);
      p.channel_block = std::max<int64_t>(1, std::min(fit, (C + T - 1) / T));
    }
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

// Moments of channels [c0, c1) (channels-first), in the same merge order as group_moments
// (pieces in order within a group, groups in order), with the channels of each piece
// visited back to back so the walk moves through neighbouring memory.
template <class T>
void block_moments(const Kernels<T>& k, const T* x, const Layout& L, const Plan& plan, int64_t c0, int64_t c1,
                   Moments<double>* out) {
  const int64_t n = c1 - c0;
  std::vector<Moments<double>> group(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[i] = Moments<double>{};
  for (int64_t g = 0; g < plan.groups; ++g) {
    const auto [b, e] = plan.range(g);
    for (int64_t i = 0; i < n; ++i) group[i] = Moments<double>{};
    for (int64_t s = b; s < e; s += kPiece)
      for (int64_t i = 0; i < n; ++i)
        group[i] = merge_moments(group[i], k.moments(x + (c0 + i) * L.channel_stride[0], L, s, std::min(e, s + kPiece)));
    for (int64_t i = 0; i < n; ++i) out[i] = merge_moments(out[i], group[i]);
  }
}

// Calls f(c, begin, end) over channels [c0, c1) piece by piece, the channels of a piece back
// to back (the elementwise passes' walk order for blocks of channels).
template <class F>
void for_block_pieces(const Plan& plan, int64_t c0, int64_t c1, F&& f) {
  for (int64_t s = 0; s < plan.count; s += kPiece)
    for (int64_t c = c0; c < c1; ++c) f(c, s, std::min(plan.count, s + kPiece));
}

// Per-channel moments of x, whichever the layout; `per_channel(c, m)` is called for each
// channel once its moments are final. In the channels-first channel-parallel plan,
// `per_block(c0, c1)` then runs on the same thread right after the block's channels are
// final, while their data is in cache (it returns false elsewhere: the caller then does its
// elementwise pass over everything afterwards).
template <class T, class F, class B>
bool all_moments(const Kernels<T>& k, const T* x, const Layout& L, const Plan& plan, F&& per_channel,
                 B&& per_block) {
  const int64_t C = L.channels;
  const int64_t work = L.count * C;
  if (plan.channels_last) {
    std::vector<Moments<double>> partial(static_cast<size_t>(plan.groups * C));
    parallel_for(plan.groups, work, [&](int64_t g) {
      std::vector<acc_t<T>> scratch(static_cast<size_t>(3 * C));
      const auto [b, e] = plan.range(g);
      k.cl_moments(x, L, b, e, partial.data() + g * C, scratch.data());
    });
    parallel_for(C, C * plan.groups * 8, [&](int64_t c) {
      Moments<double> m;
      for (int64_t g = 0; g < plan.groups; ++g) m = merge_moments(m, partial[g * C + c]);
      per_channel(c, m);
    });
    return false;
  }
  if (plan.channel_parallel) {
    parallel_for(plan.channel_blocks(C), work, [&](int64_t blk) {
      const int64_t c0 = blk * plan.channel_block, c1 = std::min(C, c0 + plan.channel_block);
      std::vector<Moments<double>> m(static_cast<size_t>(c1 - c0));
      block_moments(k, x, L, plan, c0, c1, m.data());
      for (int64_t c = c0; c < c1; ++c) per_channel(c, m[c - c0]);
      per_block(c0, c1);
    });
    return true;
  }
  {
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
  return false;
}

}  // namespace batchnorm::cpu
