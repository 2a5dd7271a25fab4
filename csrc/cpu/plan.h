// How a CPU op cuts its work: fixed groups of every reduction, chosen from the shape alone
// (so the merge order, and the bits, never depend on the thread count), and whether each
// thread takes whole channels (statistics and normalize back to back while the channel is
// in cache) or groups of one channel (few channels, many threads).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/backend.h"
#include "core/layout.h"
#include "cpu/kernels.h"
#include "cpu/scratch.h"
#include "cpu/threads.h"

namespace batchnorm::cpu {

// Bytes of the last-level cache and of one core's L2, from the OS (32 MiB and 1 MiB when it
// does not say).
int64_t last_level_cache_bytes();
int64_t l2_cache_bytes();

// Bytes above which outputs are written with non-temporal stores: the last-level cache size,
// at most kStreamBytesPerCpu per CPU this process may run on, and, where the reported cache
// passes that cap, at most the L2s of those CPUs where the store probe says regular stores do
// not pay (below), unless BATCHNORM_STREAM_BYTES or
// set_stream_threshold_bytes (tests) says otherwise. The cap matters where a VM reports its
// host's cache (2 vCPUs of an Intel Xeon reporting 300-480 MB, whose reads slow down past
// 64-128 MB): there ops of 64-205 MB ran as fast or 1.1-1.8x faster streamed, in a hot loop of
// the same call and after a 64 MB scrub alike (2 threads: 40x64x56x56 NHWC inference 1.34 ->
// 1.19 ms, 128x64x56x56 NHWC inference 7.7 -> 4.3 ms, 64x64x56x56 NCHW training 3.7 -> 2.6 ms,
// 256x2048x7x7 NCHW backward the same). Smaller ops keep regular stores: a 4 MiB cap had slowed
// a hot loop of the same call 1.3-2.2x at 16-25 MB, where the cache is there. Where the
// reported cache is at most 32 MiB per CPU (the 2-vCPU AMD EPYC VM: 32 MB) nothing changes.
constexpr int64_t kStreamBytesPerCpu = int64_t(32) << 20;
// The store probe (cpu/store_probe.cpp): the time of a pass writing 4 L2s of output with
// non-temporal stores over the same pass with regular stores into an array of their own, left
// wherever its last pass left it (in the cache, where the cache holds it), measured once per
// process on first need; 0 off x86-64 with GCC or clang (not measured). Below
// kStreamingBeatsCache non-temporal stores win even the regular ones' best case, an output the
// cache kept, and win more where it did not (an output last written a layer ago): where the
// reported cache passes the cap, that cache does not pay regular stores back, whatever size it
// reports, and outputs past the CPUs' L2s stream (each L2 counted once, however many of the
// CPUs share it: sysfs's shared_cpu_list).
// A 2-vCPU Intel Xeon VM (model 207, 260 MiB L3 reported, 2 MiB L2 each) reads 0.65-0.88,
// and against its 64 MiB cap the L2s' threshold took, 2 threads, 25 cases of 3-40 MB
// (bench/results/stream-policy-intel-probe.txt; ratio = time with the L2s' threshold / time
// with the cap):
//   - between PyTorch's same op and a copy: inference 0.56-0.99x (4096x1024 1.35 -> 0.76 ms),
//     training 0.66-0.88x, backward 0.75-0.84x;
//   - hot loops of the same call: inference 0.72-1.14x, training 0.83-1.07x, backward
//     0.89-1.04x (seven cases over 1.0x: 1.02-1.14x);
//   - a producer writing x, the op and a consumer reading its output, timed together:
//     0.87-1.02x, but for 64x512x7x7 NCHW bfloat16 inference, 1.12x (0.99x between calls; its
//     98-byte planes streamed, its rounding computed without AVX512_BF16).
// Only a cache reported past the cap is in doubt; one within it is taken at its word, with no
// probe (as is one the OS does not report, counted as 32 MiB): the 2-vCPU AMD EPYC Zen 3 VM
// (32 MiB L3, 512 KiB L2 each) reads 0.63-0.86 too, yet there the L2s' threshold (1 MiB)
// lost to the cap (32 MiB) where it counts, 2 threads, the
// same 25 cases (bench/results/stream-policy-amd-zen3-probe.txt; ratio = time with the L2s'
// threshold / time with the cap): in the producer-op-consumer chain 0.98-1.42x (16x64x28x28
// inference 1.42x, training 1.28x, NHWC backward 1.22x), in hot loops 0.85-2.08x (2048x1024
// inference 2.08x), against 0.71-1.06x between PyTorch's op and a copy. A model of the chain
// in plain passes there (bench/store_chain.c, 2 MiB arrays: a producer's pass writing x, the
// op's pass, a consumer's pass) took 1.19-1.29x the time with the op's pass streamed (six
// runs): its L3 pays regular stores back to the next reader, which the probe's passes alone
// do not see.
double store_probe_ratio();
constexpr double kStreamingBeatsCache = 1.0;
int64_t stream_threshold_bytes();
// stream_threshold_bytes() < bytes, asking the store probe only where its answer decides it (an
// op of a few bytes never pays for the probe's passes: 12-30 ms once on the Intel Xeon VM).
bool stream_threshold_below(int64_t bytes);
int64_t stream_threshold_from_env();  // -1 when unset; ValueError when malformed
void set_stream_threshold(int64_t bytes);  // < 0: back to the default

// Whether an op touching `bytes` of memory should write its output with non-temporal
// stores: when its data cannot stay in the last-level cache anyway.
inline bool stream_output(int64_t bytes) { return stream_threshold_below(bytes); }

// stream_output for an op that reads its inputs again after a reduction over them (training's
// x, the backward's dy and x): it streams past half the threshold. Arrays that fill the whole
// cache do not stay there for the second read: each pass walks them in the same order, so a
// least-recently-used cache has evicted each line before it comes round again, and the
// output's regular stores first read every line they write. Neighbours share the cache too (a
// 2-vCPU VM: one 32 MB L3 per 8 cores). AMD EPYC Zen 4, streamed at 16 MiB against 32 MiB:
//   - each call between PyTorch's same op and a copy (the two policies alternating, neither
//     right after the other), 2 threads, float32: training 4096x1024 2.44 -> 1.92 ms, 65536x64
//     1.40 -> 1.02 ms, 8x32x112x112 NCHW 1.12 -> 0.96 ms, 16x64x56x56 NCHW 1.37 -> 1.03 ms;
//     backward 8x32x96x96 NCHW 1.31 -> 1.02 ms, 36000x64 1.41 -> 1.14 ms, 2400x1024 2.09 ->
//     1.91 ms; 1 thread 0.76-0.82x the time. Half types: 32x64x56x56 NCHW training bfloat16
//     0.92-0.94x the time, float16 0.83-0.84x; channels-last, 4096x1024 and the backward
//     0.95-1.05x;
//   - a hot loop of the same call (one output, 2 threads, a process each): training 4096x1024
//     1.47-1.71 -> 1.31-1.40 ms, 65536x64 1.27-1.63 -> 0.80-1.19 ms; backward no clear change
//     (8x32x96x96 0.45 / 0.60 -> 0.49 / 0.53 ms, 36000x64 0.79 / 0.73 -> 0.86 / 0.60 ms).
// Inference keeps the whole threshold: streamed past half it was faster between other columns
// (36000x64 0.44 -> 0.39 ms, 65536x64 0.98 -> 0.76 ms) but 1.5x slower in hot loops whose x
// and y stay in cache (36000x64 0.24 -> 0.36 ms), as a consumer of y right after would find
// them. (Half types' NCHW inference streamed was 1.18-1.31x the time as the first case of a
// fresh process, 0.99-1.01x after other cases: cause not found.) bench/stream_policy.py
// measures both settings on any machine. SyncBatchNorm's split ops count as rereads too
// (forward_training given batch statistics after statistics, backward_elemt after
// backward_reduce): the small collective between the two reads changes nothing of the above.
// The two ops in a row, between PyTorch's op and a copy, 2 threads, float32: forward 4096x1024
// 2.11 -> 1.73 ms, 65536x64 1.76 -> 1.39 ms, 8x32x112x112 NCHW 1.45 -> 1.23 ms; backward
// 8x32x96x96 NCHW 1.74 -> 1.40 ms, 36000x64 1.59 -> 1.51 ms; hot loops (a process each)
// forward 4096x1024 2.05-2.55 -> 1.37-1.84 ms, 8x32x112x112 0.93-1.09 -> 0.82-0.88 ms,
// backward 36000x64 1.17-1.35 -> 1.08-1.11 ms.
inline bool stream_rereads(int64_t bytes) { return stream_output(2 * bytes); }

// Channels-first planes (the inner reduced dim) shorter than this many bytes of accumulators
// (2x2 and 3x3 at float32, up to 15 values; up to 7 at float64) are tiny: channel by channel they
// are reduced and mapped a few values at a time, below one vector. Where each array's planes
// lie back to back, channel after channel (contiguous NCHW), every outer index holds C * plane
// values in a row: the plan walks them as channels-last positions of C * plane channels, and
// merges each channel's plane of partials after the reduction. 8x512x2x2 float32 training
// took 155 us (torch 24 us) on the Xeon, 2 threads. The rule reads the shape and the dtype
// alone, so the bits do not depend on the thread count or the ISA level. The walk keeps per
// view channel partials (24 B a group) and spread coefficients: it needs a few positions to
// pay for them (2x2048x3x3 training took 350 us this way, 190 channel by channel; 4 positions
// were faster either way), and is bounded to 2^16 view channels (a few MB of temporaries; a
// (1048576, 8) array reduced over axis 1 had grown its peak memory by 361 MB).
constexpr int64_t kTinyPlaneBytes = 64;
constexpr int64_t kTinyMinPositions = 4;
constexpr int64_t kTinyMaxChannels = int64_t(1) << 16;

inline bool tiny_planes(const Layout& L, int64_t acc_bytes) {
  const int64_t plane = L.inner();
  if (L.count == 0 || plane < 2 || plane * acc_bytes >= kTinyPlaneBytes || L.channels_last()) return false;
  if (L.count / plane < kTinyMinPositions || L.channels > kTinyMaxChannels / plane) return false;
  for (int t = 0; t < L.ntensors; ++t)
    if (L.inner_stride(t) != 1 || L.channel_stride[t] != plane) return false;
  return true;
}

// The channels-last walk of a tiny-plane layout: channel c's value i of a plane is channel
// c * plane + i, the outer dims are the positions.
inline Layout planes_as_channels(const Layout& L) {
  Layout W = L;
  W.channels = L.channels * L.inner();
  W.count = L.count / L.inner();
  W.nred = L.nred > 1 ? L.nred - 1 : 1;
  for (int t = 0; t < L.ntensors; ++t) {
    W.channel_stride[t] = 1;
    if (L.nred == 1) W.strides[t][0] = 0;  // one position
  }
  if (L.nred == 1) W.sizes[0] = 1;
  return W;
}

// Per-channel values spread over the tiny-plane walk's channels: n arrays of C values each
// become n consecutive arrays of C * plane values in `out`.
template <class A>
void spread_over_planes(const A* const* v, int n, int64_t C, int64_t plane, buffer<A>& out) {
  out.resize(static_cast<size_t>(n * C * plane));
  A* o = out.data();
  for (int j = 0; j < n; ++j)
    for (int64_t c = 0; c < C; ++c, o += plane) std::fill(o, o + plane, v[j][c]);
}

// Channels per block of a channel-parallel plan over small planes whose evenly sized blocks
// (`block` channels) hold more than kBlockChannels: the kernels take a block's channels
// kBlockChannels at a time, and a rest of a few channels is as many short runs or rows. So
// whole kBlockChannels units where that keeps the threads' shares even: the most units, at most
// `fit` channels' worth, whose blocks give no thread more units than an even split would (one
// thread: the most units); and
// `block` as it was where units alone would give a thread more than an eighth over its share
// (few channels). A block of 20 or 40 channels (Intel's 2 MiB L2, half types, 256x2048x7x7)
// or 147 (32x2048x7x7 in cache: 2048 channels in 14 blocks) left a rest of 4, 8 or 3 channels.
// Intel Xeon (model 207), in-process A/B against blocks as they were, both orders, NCHW:
// from memory 256x2048x7x7 statistics bfloat16 (40 channels -> 32) 0.89-0.93x the time (2
// threads), float32 (20 -> 16) 0.88-0.90x; training bfloat16 (20 -> 16) 0.84-0.87x, float16
// 0.82-0.85x (1 thread), float32 and backward level; in cache 32x2048x7x7 (147 -> 128, 2
// threads) training bfloat16 0.90-0.94x, float32 0.92-0.93x, backward bfloat16 0.89-0.93x;
// 64x512x7x7, 8x512x7x7, 16x1024x7x7, 4x2048x7x7, 128x256x5x5 level (0.98-1.02x).
inline int64_t small_plane_block(int64_t C, int64_t fit, int64_t T, int64_t block) {
  const int64_t units = (C + kBlockChannels - 1) / kBlockChannels, share = (units + T - 1) / T;
  const int64_t most = std::min(std::max<int64_t>(1, fit / kBlockChannels), share);
  if (T == 1) return most * kBlockChannels;  // one thread: no shares to keep even
  if (share * kBlockChannels * T * 8 > C * 9) return block;
  for (int64_t u = most; u > 1; --u)
    if (((units + u - 1) / u + T - 1) / T * u == share) return u * kBlockChannels;
  return kBlockChannels;
}

struct Plan {
  int64_t plane = 0;   // > 0: tiny planes of this many values, walked as `view` (channels-last)
  Layout view;
  // The op's data exceed the streaming threshold, so they come from memory: the maps' short-row
  // block walks prefetch rows ahead (planes C rows apart are too far apart for the hardware
  // prefetchers), and their stores are non-temporal (MapPass::nt, but for the backward's dx:
  // see backward.cpp). In cache the prefetches cost more than they save: Xeon, 2 threads,
  // float32, 8x512x7x7 inference 27.6 -> 21.5 us without them. (The reductions' short-row
  // walks read rows in tiles instead, kernels/moments.h, and prefetch nothing.)
  bool from_memory = false;
  bool channels_last = false;
  int64_t groups = 1;   // channels-first: groups per channel; channels-last: groups of positions
  int64_t pieces = 1;   // channels-first: kPiece blocks per channel
  int64_t count = 0;
  bool channel_parallel = true;  // channels-first: one task per block of channels
  // Channels per task: channels-first channel-parallel plans; channels-last plans (a multiple
  // of kMergeChannels, or the whole row), whose tasks are (group, block of channels).
  int64_t channel_block = 1;
  int64_t threads = 1;  // channels-first: the thread count the blocks were sized for

  int64_t channel_blocks(int64_t C) const { return (C + channel_block - 1) / channel_block; }
  // The layout the executors walk: the op's, or its tiny-plane view.
  const Layout& walk(const Layout& L) const { return plane ? view : L; }

  // Channels-first: values [begin, end) of group g of a channel (piece aligned).
  // Channels-last: positions [begin, end) of group g.
  std::pair<int64_t, int64_t> range(int64_t g) const {
    if (channels_last) return {count * g / groups, count * (g + 1) / groups};
    const int64_t pb = pieces * g / groups, pe = pieces * (g + 1) / groups;
    return {pb * kPiece, std::min(count, pe * kPiece)};
  }
};

// Channels per task of the channels-last merge of group partials, and the unit of its blocks of
// channels.
constexpr int64_t kMergeChannels = 64;
// Channels-last tasks take at least this many channels of a row, and this many values; at
// least kMinBalanceChannels when the split only evens the threads' loads.
constexpr int64_t kMinTaskChannels = 256;
constexpr int64_t kMinTaskValues = 1 << 14;
constexpr int64_t kMinBalanceChannels = 1024;

// Channels per task of a channels-last plan with `groups` groups of positions (`count`
// positions in all): the whole row, unless the groups alone leave threads idle (fewer than
// two per thread: (64, 4096), or 32x2048x3x3 as tiny planes, ran on one thread) or, for wide
// rows, unevenly loaded (a count that is not a multiple of the thread count, below eight per
// thread: 7 groups of 8x7x7x2048 on 2 threads, 4 and 3). Then as few blocks of whole merge
// units as fix that. (Halving 512-channel rows to even out 7 groups, 448x512 inference went
// from 23.5 to 28-31 us.) The kernels give a block the bits of the whole row (kernels.h), so
// this may follow the thread count.
inline int64_t channels_last_block(int64_t C, int64_t count, int64_t groups) {
  const int64_t T = thread_count();
  if (T == 1) return std::max<int64_t>(C, 1);
  const int64_t most = std::max<int64_t>(1, std::min(C / kMinTaskChannels, C * (count / groups) / kMinTaskValues));
  int64_t blocks = 1;
  while (blocks < most && groups * blocks < 2 * T) ++blocks;
  const int64_t most_even = std::min(most, C / kMinBalanceChannels);
  while (blocks < most_even && (groups * blocks) % T != 0 && groups * blocks < 8 * T) ++blocks;
  if (blocks == 1) return std::max<int64_t>(C, 1);
  const int64_t per = (C + blocks - 1) / blocks;
  return std::max<int64_t>(1, (per + kMergeChannels - 1) / kMergeChannels * kMergeChannels);
}

// Channels [0, n) of a channels-last layout, for a task that takes n channels of the row
// (pointers moved to its first channel by the caller: channel stride 1).
inline Layout channel_range(const Layout& L, int64_t n) {
  Layout R = L;
  R.channels = n;
  return R;
}

// bytes_per_value: bytes of every array the op reads or writes, per value (2 * sizeof(T) for a
// forward pass, 3 * sizeof(T) for backward); sizes the channel blocks so that one block's data
// stays in L2 between its reduction and its elementwise pass.
// `rereads`: the op reads its inputs again after a reduction over them, its own or the split
// op's before it (stream_rereads); it sets from_memory, which the forward passes and
// backward_elemt stream by (the fused backward decides its own, by its distinct arrays).
template <class Value>
Plan make_plan(const Layout& op_layout, int64_t bytes_per_value, bool rereads = false) {
  Plan p;
  if (tiny_planes(op_layout, sizeof(acc_t<Value>))) {
    p.plane = op_layout.inner();
    p.view = planes_as_channels(op_layout);
  }
  const Layout& L = p.walk(op_layout);
  const int64_t bytes = L.count * L.channels * bytes_per_value;
  p.from_memory = rereads ? stream_rereads(bytes) : stream_output(bytes);
  p.count = L.count;
  p.channels_last = L.channels_last();
  if (p.channels_last) {
    p.groups = std::clamp<int64_t>((L.count + kChannelsLastMinGroup - 1) / kChannelsLastMinGroup, 1, kMaxGroups);
    p.channel_block = channels_last_block(L.channels, L.count, p.groups);
  } else {
    p.pieces = std::max<int64_t>(1, (L.count + kPiece - 1) / kPiece);
    p.groups = std::min(p.pieces, kMaxGroups);
    const int64_t T = thread_count();
    p.threads = T;
    const int64_t C = L.channels;
    p.channel_parallel = T == 1 || C >= 4 * T || (C >= T && C % T == 0) || p.groups == 1;
    if (p.channel_parallel) {
      // Channels next to each other in memory (NCHW with small planes) are walked piece by
      // piece together, so each task streams through contiguous memory; the block stays small
      // enough to be re-read from L2, and there are enough blocks for every thread.
      const int64_t channel_bytes = std::max<int64_t>(1, L.count * bytes_per_value);
      int64_t fit = std::max<int64_t>(1, l2_cache_bytes() / 2 / channel_bytes);
      // Small planes (7x7: rows of 49 values, C rows apart) are walked across the block's
      // channels (the kernels' *_channels primitives: the maps row by row, the reductions in
      // tiles of rows). A block of kBlockChannels makes each row a run of 16 planes (3 KB at
      // float32) that the prefetchers follow, and its
      // second pass then comes from the last-level cache rather than L2: 256x2048x7x7 float32
      // on 2 threads of an AMD EPYC (AVX2), blocks of 2 -> 16 channels: training 34 -> 24 ms,
      // backward 49 -> 32 ms (fastest of 11).
      const bool small = L.nred == 2 && L.strides[0][1] == 1 && L.inner() <= kSmallPlane;
      if (small) fit = std::max(fit, std::min(kBlockChannels, last_level_cache_bytes() / 2 / T / channel_bytes));
      // As few blocks as fit, a multiple of the thread count, evenly sized: blocks of at most
      // `fit` channels alone left 8x512x7x7 backward (3 blocks of 222, 222 and 68 channels) one
      // thread's worth of channels on one thread and a seventh on the other.
      const int64_t blocks = ((C + fit - 1) / fit + T - 1) / T * T;
      p.channel_block = std::max<int64_t>(1, (C + blocks - 1) / blocks);
      // Small planes in whole kBlockChannels where a block has more: the kernels take a block's
      // channels kBlockChannels at a time, and a rest of a few channels is as many short runs
      // or rows (small_plane_block).
      if (small && p.channel_block > kBlockChannels) p.channel_block = small_plane_block(C, fit, T, p.channel_block);
    }
  }
  return p;
}

// ---- the reduce executor ----------------------------------------------------------------

// m[i] = merge(m[i], part[i]) for the n channels of a block, part one channels-last group's
// partials: every channel of a group counts the group's positions, which a merge with a
// `group(m, part, n)` member may use (ChanMerge below); other merges go channel by channel.
template <class Merge, class P, class = void>
struct has_group_merge : std::false_type {};
template <class Merge, class P>
struct has_group_merge<Merge, P,
                       std::void_t<decltype(std::declval<const Merge&>().group(
                           std::declval<P*>(), std::declval<const P*>(), int64_t(0)))>> : std::true_type {};
template <class P, class Merge>
inline void merge_group(P* m, const P* part, int64_t n, const Merge& merge) {
  if constexpr (has_group_merge<Merge, P>::value) {
    merge.group(m, part, n);
  } else {
    for (int64_t i = 0; i < n; ++i) m[i] = merge(m[i], part[i]);
  }
}

// One reduction over every channel, whichever the layout, for a partial type P (Moments of
// x; backward's sums): `piece(c, b, e)` reduces values [b, e) of channel c (channels-first),
// `pieces(c0, n, b, e, out)` the same of n (<= kBlockChannels) channels from c0 into out[0..n)
// in one call (the channel-parallel walk; the same bits as n calls of piece),
// `cl(R, c0, b, e, out)` positions [b, e) of channels [c0, c0 + R.channels) of the walked
// layout into out[0..R.channels) (channels-last, and tiny planes: see Plan; R is the range's
// layout, channel_range), and
// `merge(a, b)` combines partials in a fixed order: pieces in order within a group, groups in
// order, whatever the plan, so results are bitwise reproducible across thread counts.
// `per_channel(c, p)` is called once channel c's partial is final, and `finalize(c0, c1)` once
// every channel of [c0, c1) has been through per_channel, on the same thread: per-channel
// formulas over arrays of a block of channels go there, where they vectorize (per_channel
// keeps what it needs). In the channels-first channel-parallel plan `per_block(c0, c1)` then
// runs on the same thread right after the block's finalize, while its data is in cache, and
// this returns true; elsewhere it returns false and the caller makes its elementwise pass over
// everything afterwards.
template <class P, class Piece, class Pieces, class Cl, class Merge, class F, class Fin, class B>
bool reduce_all(const Layout& L, const Plan& plan, int64_t work, Piece&& piece, Pieces&& pieces, Cl&& cl,
                Merge&& merge, F&& per_channel, Fin&& finalize, B&& per_block) {
  if (plan.channels_last) {
    const Layout& W = plan.walk(L);
    const int64_t C = W.channels;
    scratch_array<P> partial(static_cast<size_t>(plan.groups * C));  // each task writes its block
    const int64_t cb = plan.channel_block, ranges = plan.channel_blocks(C);
    parallel_for(plan.groups * ranges, work, [&](int64_t task) {
      const int64_t g = task / ranges, c0 = task % ranges * cb;
      const auto [b, e] = plan.range(g);
      cl(channel_range(W, std::min(C, c0 + cb) - c0), c0, b, e, partial.data() + g * C + c0);
    });
    // Tiny planes: the walk's channels are planes' values; each channel's plane is merged in
    // order once they are final.
    buffer<P> planes(static_cast<size_t>(plan.plane ? C : 0));
    // Groups in order for each channel (the same bits), a block of channels at a time with
    // the channels innermost: their merges are independent (a division each, pipelined rather
    // than chained) and read the partials in memory order. Channel by channel this merge was
    // 8.7% of 4096x1024 training (Xeon, 1 thread: 2.99-4.06 -> 2.61-2.85 ms).
    const int64_t blocks = (C + kMergeChannels - 1) / kMergeChannels;
    parallel_for(blocks, C * plan.groups * 8, [&](int64_t blk) {
      const int64_t c0 = blk * kMergeChannels, n = std::min(C, c0 + kMergeChannels) - c0;
      // The first group merged into P{} as written out, into storage left unwritten: an array
      // of P (zero-initialized members) was a 1.5 KB fill per block.
      alignas(P) unsigned char storage[kMergeChannels * sizeof(P)];
      P* m = reinterpret_cast<P*>(storage);
      for (int64_t i = 0; i < n; ++i) new (m + i) P(merge(P{}, partial[c0 + i]));
      for (int64_t g = 1; g < plan.groups; ++g) merge_group(m, partial.data() + g * C + c0, n, merge);
      if (plan.plane) {
        for (int64_t i = 0; i < n; ++i) planes[c0 + i] = m[i];
      } else {
        for (int64_t i = 0; i < n; ++i) per_channel(c0 + i, m[i]);
        finalize(c0, c0 + n);
      }
    });
    if (plan.plane) {
      for (int64_t c = 0; c < L.channels; ++c) {
        P m{};
        for (int64_t i = 0; i < plan.plane; ++i) m = merge(m, planes[c * plan.plane + i]);
        per_channel(c, m);
      }
      finalize(0, L.channels);
    }
    return false;
  }
  const int64_t C = L.channels;
  if (plan.channel_parallel) {
    // Blocks of channels, walked piece by piece with the block's channels back to back.
    parallel_for(plan.channel_blocks(C), work, [&](int64_t blk) {
      const int64_t c0 = blk * plan.channel_block, c1 = std::min(C, c0 + plan.channel_block);
      const int64_t n = c1 - c0;
      buffer<P> total(static_cast<size_t>(n)), group(static_cast<size_t>(n));
      P part[kBlockChannels];
      for (int64_t g = 0; g < plan.groups; ++g) {
        const auto [b, e] = plan.range(g);
        for (int64_t i = 0; i < n; ++i) group[i] = P{};
        for (int64_t s = b; s < e; s += kPiece)
          for (int64_t i0 = 0; i0 < n; i0 += kBlockChannels) {
            const int64_t m = std::min(kBlockChannels, n - i0);
            pieces(c0 + i0, m, s, std::min(e, s + kPiece), part);
            for (int64_t i = 0; i < m; ++i) group[i0 + i] = merge(group[i0 + i], part[i]);
          }
        for (int64_t i = 0; i < n; ++i) total[i] = merge(total[i], group[i]);
      }
      for (int64_t i = 0; i < n; ++i) per_channel(c0 + i, total[i]);
      finalize(c0, c1);
      per_block(c0, c1);
    });
    return true;
  }
  // Few channels: (channel, group) tasks, then each channel's groups merged in order.
  buffer<P> partial(static_cast<size_t>(plan.groups * C));
  parallel_for(C * plan.groups, work, [&](int64_t i) {
    const int64_t c = i / plan.groups;
    const auto [b, e] = plan.range(i % plan.groups);
    P m{};
    for (int64_t s = b; s < e; s += kPiece) m = merge(m, piece(c, s, std::min(e, s + kPiece)));
    partial[i] = m;
  });
  for (int64_t c = 0; c < C; ++c) {
    P m{};
    for (int64_t g = 0; g < plan.groups; ++g) m = merge(m, partial[c * plan.groups + g]);
    per_channel(c, m);
  }
  finalize(0, C);
  return false;
}

// Calls f(c, begin, end) over channels [c0, c1) piece by piece, the channels of a piece back
// to back (the elementwise passes' walk order for blocks of channels).
template <class F>
void for_block_pieces(const Plan& plan, int64_t c0, int64_t c1, F&& f) {
  for (int64_t s = 0; s < plan.count; s += kPiece)
    for (int64_t c = c0; c < c1; ++c) f(c, s, std::min(plan.count, s + kPiece));
}

// Chan's merge of moments (merge_moments), and of a block of a channels-last group's channels
// at once (group, for merge_group): their counts are the same in every channel, so the merge's
// weights are computed once per group and block (merge_weights; the same operations, the same
// bits) rather than a division per channel and group, which had made the merge 5% of
// 4096x1024 training (64 groups). AMD EPYC Zen 4, in-process, both orders, in cache: 4096x1024
// float32 training 0.98x the time (2 threads), statistics 0.96-0.97x, 65536x64 statistics
// 0.98-0.99x. What is left of it (3-4%) waits on the partials (1.5 MB there) coming from the
// other thread's cache.
struct ChanMerge {
  Moments<double> operator()(const Moments<double>& a, const Moments<double>& b) const { return merge_moments(a, b); }
  // m[i] = merge_moments(m[i], part[i]), every m[i] counting m[0].n values and every part[i]
  // part[0].n.
  void group(Moments<double>* m, const Moments<double>* part, int64_t n) const {
    if (n == 0 || part[0].n == 0) return;  // merge_moments(a, b) is a when b is empty
    if (m[0].n == 0) {
      std::copy(part, part + n, m);
      return;
    }
    const MergeWeights<double> w = merge_weights(m[0].n, part[0].n);
    for (int64_t i = 0; i < n; ++i) m[i] = merge_weighted(m[i], part[i], w);
  }
};
static_assert(has_group_merge<ChanMerge, Moments<double>>::value, "merge_group takes ChanMerge's group");

// Calls f(value as double) for every value of one channel (xc: its first), rows of the walk
// in order: the scalar walk of the fallback below.
template <class T, class F>
void each_value(const T* xc, const Layout& L, F&& f) {
  const int64_t inner = L.inner(), stride = L.inner_stride(0);
  for (int64_t o = 0; o < L.count / inner; ++o) {
    const T* row = xc + L.outer_offset(0, o);
    for (int64_t i = 0; i < inner; ++i) f(static_cast<double>(load(row[i * stride])));
  }
}

// Calls f(a, b) as doubles for every value pair of one channel of two arrays (ac, bc: their
// firsts, arrays 0 and 1 of the layout), rows of the walk in order.
template <class T, class F>
void each_pair(const T* ac, const T* bc, const Layout& L, F&& f) {
  const int64_t inner = L.inner(), sa = L.inner_stride(0), sb = L.inner_stride(1);
  for (int64_t o = 0; o < L.count / inner; ++o) {
    const T* ra = ac + L.outer_offset(0, o);
    const T* rb = bc + L.outer_offset(1, o);
    for (int64_t i = 0; i < inner; ++i) f(static_cast<double>(load(ra[i * sa])), static_cast<double>(load(rb[i * sb])));
  }
}

// Whether every value of one channel of array t of the layout (xc: its first) is finite,
// stopping at the first NaN or Inf: the rescues below ask it first, so a channel that is
// non-finite because of its values (a loss scaler's overflow step: Infs in every channel)
// costs a scan up to its first bad value, not a scalar scan of the whole channel (which had
// made such a backward 18-23x slower). Contiguous rows are tested 64 values at a time
// (all_finite, vectorized), strided ones value by value.
template <class T>
bool channel_finite(const T* xc, const Layout& L, int t) {
  const int64_t inner = L.inner(), stride = L.inner_stride(t);
  for (int64_t o = 0; o < L.count / inner; ++o) {
    const T* row = xc + L.outer_offset(t, o);
    int64_t i = 0;
    if (stride == 1)
      for (; i < inner; i += 64)
        if (!all_finite(row + i, std::min<int64_t>(64, inner - i))) return false;
    for (; i < inner; ++i)
      if (!all_finite(row + i * stride, 1)) return false;
  }
  return true;
}

// A channel's (mean, biased variance) again, in double and scaled by a power of two, when the
// kernels' are not finite though its values are. The kernels sum blocks in the accumulation
// type, whose sums of finite values overflow where double's do not: float32 or bfloat16 values
// past about 1e37 (their sum), deviations past about 1e18 (their squares; a variance past 1e36
// came back Inf, and invstd 0, y 0). The variance is taken at the scale (m2 / n there) and
// scaled back, so a count x variance past double's range (float64 values near 1e154 and more)
// does not overflow it either. A channel holding a NaN or an Inf keeps the kernels' moments
// (NaN propagates as ever); others never get here, so their bits are the kernels'. Two scalar
// passes over the channel, single-threaded: a cost only where the result was wrong (out of
// line and cold: inlined, it had slowed the per-channel loop of (16, 2048) statistics 1.1x).
struct MeanVar {
  double mean;
  double var;  // biased
};
template <class T>
[[gnu::noinline, gnu::cold]] MeanVar rescued_statistics(const T* xc, const Layout& L, const Moments<double>& m) {
  const MeanVar kernels{m.mean, biased_variance(m)};
  if (!channel_finite(xc, L, 0)) return kernels;
  double largest = 0.0, lo = std::numeric_limits<double>::infinity(), hi = -lo;
  each_value(xc, L, [&](double v) {
    largest = std::max(largest, std::fabs(v));
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  });
  if (largest == 0.0) return kernels;
  // A constant channel is its value with variance 0: the scaled mean's rounding (an ulp of
  // values about 1e200, squared and scaled back) would make its variance Inf.
  if (lo == hi) return MeanVar{lo, 0.0};
  // Values over 2^e in [1, 2): sums of squares stay far from double's range (float64 inputs).
  const int e = std::ilogb(largest);
  const double n = static_cast<double>(L.count);
  double sum = 0.0;
  each_value(xc, L, [&](double v) { sum += std::ldexp(v, -e); });
  const double mean = sum / n;
  double m2 = 0.0;
  each_value(xc, L, [&](double v) {
    const double d = std::ldexp(v, -e) - mean;
    m2 += d * d;
  });
  return MeanVar{std::ldexp(mean, e), std::ldexp(m2 / n, 2 * e)};
}

// Per-channel (mean, biased variance) of x (the reduce executor with the Chan merge):
// per_channel(c, mean, var), finalize and per_block as in reduce_all. Statistics that
// overflowed are recomputed (rescued_statistics).
template <class T, class F, class Fin, class B>
bool all_moments(const Kernels<T>& k, const T* x, const Layout& L, const Plan& plan, F&& per_channel_fast,
                 Fin&& finalize, B&& per_block) {
  auto per_channel = [&](int64_t c, const Moments<double>& m) {
    if (std::isfinite(m.mean) && std::isfinite(m.m2)) [[likely]]
      return per_channel_fast(c, m.mean, biased_variance(m));
    const MeanVar r = rescued_statistics(x + c * L.channel_stride[0], L, m);
    per_channel_fast(c, r.mean, r.var);
  };
  const int64_t C = L.channels;
  const int64_t run = channels_last_run(plan.walk(L).channels, sizeof(T));  // of the whole row
  return reduce_all<Moments<double>>(
      L, plan, L.count * C,
      [&](int64_t c, int64_t b, int64_t e) { return k.moments(x + c * L.channel_stride[0], L, b, e); },
      [&](int64_t c0, int64_t n, int64_t b, int64_t e, Moments<double>* out) {
        k.moments_channels(x + c0 * L.channel_stride[0], L, n, b, e, out);
      },
      [&](const Layout& R, int64_t c0, int64_t b, int64_t e, Moments<double>* out) {
        scratch_array<acc_t<T>> scratch(static_cast<size_t>(3 * R.channels));  // written before read
        k.cl_moments(x + c0, R, b, e, run, out, scratch.data());
      },
      ChanMerge{}, per_channel,
      finalize, per_block);
}

// ---- the elementwise executor ----------------------------------------------------------

// Rows at least this long are walked in memory order by the forward's elementwise pass
// (walks_memory_order).
constexpr int64_t kMemoryOrderRow = 1024;
// Streamed (from memory), rows of at least this many bytes are walked in memory order too: in
// channel blocks their runs were slower. AMD EPYC Zen 4, inference, data from memory, memory
// order against channel blocks: 28x28 rows (3136 B float32, 1568 B half) 0.75-0.92x the time
// (64x256x28x28 float32 2 threads 3.51 -> 2.84 ms), 12x24 float32 (1152 B) 0.87-0.93x, 24x24
// bfloat16 (1152 B) 0.87x. Rows of 1 KB and less had been slower in memory order (14x14
// float32 1.47-1.53x) while map_channels fenced after every plane; with one fence per call
// (2 threads, in-process, 64 MB scrub, both orders): 16x16 float32 (1 KB) 0.68-0.69x, 14x14
// float32 (784 B) 0.86-0.90x (1 thread 0.73-0.83x), 12x12 float32 (576 B) 0.56x (1 thread
// 0.56-0.58x); 14x14 float16 0.91-1.01x, 16x16 bfloat16 0.95-1.05x; 14x14 float32 fused
// with a residual and a ReLU 0.72x, the fused backward's ReLU-gradient pass (elementwise.cpp)
// 0.88-0.91x (12x12 0.94-1.02x); float64 11x11 (968 B) 0.87-1.12x, 8x8 (512 B) 0.87-0.95x;
// training, whose maps follow its reduction, 0.98-1.01x. 10x10 float32 (400 B) was slower
// (1.16-1.32x), 9x9 float32 (324 B) mixed (0.93-1.17x). (The walk splits the outer index only:
// fewer outer indices than threads leave threads idle, as for the longer rows before; 2 vCPUs
// here could not show it.)
constexpr int64_t kMemoryOrderStreamedRowBytes = 512;

// Rows the kernels take as short rows (16-64 float or 8-32 double accumulators: a 7x7 plane
// of float32 or a half type) are also walked in memory order when the data comes from DRAM
// (`nt`): channel by channel they are a few cache lines every C rows, 2.2x slower on
// 256x2048x7x7 float32. In cache the memory-order walk once measured slower (256x512x5x5:
// 0.81x copy by channel blocks, 0.49x in memory order; 2 threads, an earlier build); measured
// again on AMD at 98e491d it was faster past three quarters of the streaming threshold (that
// shape, 26 MB: 0.89-0.90 -> 0.80-0.82 ms) and slower below it (walks_memory_order).
template <class T>
bool short_rows(const Layout& L) {
  const int64_t bytes = L.inner() * static_cast<int64_t>(sizeof(acc_t<T>));
  return L.strides[0][L.nred - 1] == 1 && bytes >= 64 && bytes <= 256;
}

// One elementwise pass, out = recipe(coefficients of the channel, in...), its arrays laid out
// in the Layout in the order (in..., out).
template <class T>
struct MapPass {
  MapKind kind = MapKind::normalize;
  const T* in[2] = {};
  T* out = nullptr;
  const acc_t<T>* coef[4] = {};  // (C,) values of each of the recipe's coefficients
  bool nt = false;               // non-temporal stores (see stream_output)
  // The inputs come from memory: a pass of its own (map_all) with nt, rather than one that
  // follows a reduction over the same block of channels (Kernels::map_channels).
  bool cold = false;
  // May walk memory in order, as a copy would (walks_memory_order; measured for the forward
  // passes, the backward's were tuned without it).
  bool memory_order = false;
};

// Whether an elementwise pass with memory_order walks memory in order (every channel of one
// outer index, then the next), as a copy would, rather than in channel blocks: always for rows
// of kMemoryOrderRow values or more; for shorter rows in cache once its arrays outgrow part of
// the cache, half the streaming threshold (three quarters for the short rows that the block
// walk takes 16 channels at a time, in runs of 3 KB). In channel blocks each channel's rows
// are a few cache lines every C rows, too short for the prefetchers once they come from the
// far cache. AMD EPYC, float32 inference, 2 threads: 64x256x14x14 0.66-1.00 -> 0.50-0.68 ms
// (PyTorch 0.54-0.67), 20x256x28x28 0.80-0.86 -> 0.62-0.66 ms, 32x2048x7x7 0.74-0.97 ->
// 0.65-0.73 ms (PyTorch 0.68-0.78); at 16-22 MB short rows were 15-18% slower in memory order
// (28x2048x7x7), and below that all rows (16x256x14x14 by 12%). Streamed passes walk memory
// in order once their rows are kMemoryOrderStreamedRowBytes or more.
template <class T>
bool walks_memory_order(const MapPass<T>& m, const Layout& L) {
  if (!m.memory_order || L.nred != 2) return false;
  if (L.inner() >= kMemoryOrderRow) return true;
  if (m.nt) return L.inner() * static_cast<int64_t>(sizeof(T)) >= kMemoryOrderStreamedRowBytes;
  const int64_t bytes = (map_inputs(m.kind) + 1) * L.count * L.channels * static_cast<int64_t>(sizeof(T));
  // bytes * 4 >= threshold * k, in integers: threshold <= floor(bytes * 4 / k).
  return stream_threshold_below(bytes * 4 / (short_rows<T>(L) ? 3 : 2) + 1);
}

// A channels-last pass (coefficients `coef`) moved to channel c0 of every array: a task's
// block of channels (channel stride 1).
template <class T>
MapPass<T> channels_from(const MapPass<T>& m, const acc_t<T>* const* coef, int64_t c0) {
  MapPass<T> r = m;
  for (int j = 0; j < map_inputs(m.kind); ++j) r.in[j] = m.in[j] + c0;
  r.out = m.out + c0;
  for (int j = 0; j < map_coefficients(m.kind); ++j) r.coef[j] = coef[j] + c0;
  return r;
}

// The map pass of one of the op layer's elementwise passes (core/backend.h), regular stores.
template <class T>
MapPass<T> elementwise_pass(const ElementwiseParams& p) {
  MapPass<T> m;
  m.kind = p.kind == ElementwiseKind::relu_grad ? MapKind::relu_grad
           : p.kind == ElementwiseKind::add     ? MapKind::add
                                                : MapKind::copy;
  m.in[0] = p.in0.ptr<const T>();
  m.in[1] = p.in1.defined() ? p.in1.ptr<const T>() : nullptr;
  m.out = p.out.ptr<T>();
  return m;
}

// Values [b, e) of channels [c0, c1) (channels-first; one channel: c1 = c0 + 1) in one call:
// short rows row by row across the channels.
template <class T>
void map_channel_range(const Kernels<T>& k, const MapPass<T>& m, const Layout& L, int64_t c0, int64_t c1, int64_t b,
                       int64_t e) {
  const int n = map_inputs(m.kind);
  const T* in[2] = {};
  for (int j = 0; j < n; ++j) in[j] = m.in[j] + c0 * L.channel_stride[j];
  const acc_t<T>* coef[4] = {};
  for (int j = 0; j < map_coefficients(m.kind); ++j) coef[j] = m.coef[j] + c0;
  k.map_channels[static_cast<int>(m.kind)](in, m.out + c0 * L.channel_stride[n], L, c1 - c0, b, e, coef, m.nt,
                                           m.cold);
}

// Channels [c0, c1) (channels-first), piece by piece with the block's channels back to back:
// the walk of the fused passes that follow a block's reduction while its data is in cache.
template <class T>
void map_channels(const Kernels<T>& k, const MapPass<T>& m, const Layout& L, const Plan& plan, int64_t c0,
                  int64_t c1) {
  // One kernel call for the block where the kernel walks it as this would: short rows row by
  // row across the block's channels, or channels of one piece each (N = 1: a call per channel
  // cost more than its values, 1x1024x7x7 float32 inference on AMD, 1 thread, took 47 us).
  if ((L.nred == 2 && short_rows<T>(L)) || plan.count <= kPiece) {
    map_channel_range(k, m, L, c0, c1, 0, plan.count);
    return;
  }
  for_block_pieces(plan, c0, c1, [&](int64_t c, int64_t b, int64_t e) { map_channel_range(k, m, L, c, c + 1, b, e); });
}

// Channels per task of a channels-first, channel-parallel map pass: the plan's blocks, or for a
// streamed pass of its own over short planes back to back (map_run_streams) enough for a run
// of kStreamRunBytes (stream_run_channels, whose multiple of run_line_channels keeps runs whole
// cache lines), in a multiple of the thread count of tasks where the channels allow.
template <class T>
int64_t map_channel_block(const MapPass<T>& m, const Layout& L, const Plan& plan) {
  if (!(m.cold && m.nt && L.nred == 2 && short_rows<T>(L))) return plan.channel_block;
  const int64_t C = L.channels, threads = std::max<int64_t>(1, plan.threads);
  const int64_t plane_bytes = L.inner() * static_cast<int64_t>(sizeof(T));
  const int64_t want = stream_run_channels(plane_bytes), unit = run_line_channels(plane_bytes);
  const int64_t tasks = std::max<int64_t>(threads, C / want / threads * threads);
  const int64_t even = (C + tasks - 1) / tasks;
  // Whole lines may leave a number of tasks that splits unevenly over the threads (66 7x7
  // bfloat16 channels on 2 threads: tasks of 32, 32 and 2), kept so for now: even tasks would be
  // runs of 17 planes (1666 bytes), the short runs this replaces, and on a VM where one thread
  // all but fills the memory's bandwidth (np.copyto 1.2x faster on 2 threads than on 1) the
  // split matters less than the runs. Not measured cleanly: the A/B of the two ran beside a CI
  // job and moved 0.4-1.7x from run to run.
  return std::max({plan.channel_block, even / unit * unit, int64_t(1)});
}

// The whole array, whichever the layout, split as the plan says.
template <class T>
void map_all(const Kernels<T>& k, const MapPass<T>& pass, const Layout& L, const Plan& plan) {
  MapPass<T> m = pass;
  m.cold = pass.nt;  // a pass of its own: data past the streaming threshold come from memory
  const int64_t C = L.channels;
  const int64_t work = map_inputs(m.kind) * L.count * C;
  if (plan.channels_last) {
    const acc_t<T>* const* coef = m.coef;
    const acc_t<T>* spread[4] = {};
    buffer<acc_t<T>> values;
    if (plan.plane) {  // the coefficients of each tiny plane's values
      const int n = map_coefficients(m.kind);
      spread_over_planes(m.coef, n, C, plan.plane, values);
      for (int j = 0; j < n; ++j) spread[j] = values.data() + j * C * plan.plane;
      coef = spread;
    }
    const Layout& W = plan.walk(L);
    const int64_t cb = plan.channel_block, blocks = plan.channel_blocks(W.channels);
    parallel_for(plan.groups * blocks, work, [&](int64_t task) {
      const int64_t g = task / blocks, c0 = task % blocks * cb;
      const auto [b, e] = plan.range(g);
      const MapPass<T> r = channels_from(m, coef, c0);
      k.cl_map[static_cast<int>(m.kind)](r.in, r.out, channel_range(W, std::min(W.channels, c0 + cb) - c0), b, e,
                                         r.coef, m.nt);
    });
  } else if (walks_memory_order(m, L)) {
    // Memory order (all channels of one outer index, then the next), as a copy would, one
    // kernel call per outer index. (Short rows streamed this way too, before
    // the block walks: 256x2048x7x7 inference on the Xeon, 2 threads, 12-18 ms, against 9.6-9.9
    // ms in channel blocks.)
    parallel_for(L.sizes[0], work, [&](int64_t o) {
      map_channel_range(k, m, L, 0, C, o * L.inner(), (o + 1) * L.inner());
    });
  } else if (plan.channel_parallel) {
    const int64_t cb = map_channel_block(m, L, plan);
    parallel_for((C + cb - 1) / cb, work, [&](int64_t blk) {
      const int64_t c0 = blk * cb;
      map_channels(k, m, L, plan, c0, std::min(C, c0 + cb));
    });
  } else {
    parallel_for(C * plan.groups, work, [&](int64_t i) {
      const int64_t c = i / plan.groups;
      const auto [b, e] = plan.range(i % plan.groups);
      map_channel_range(k, m, L, c, c + 1, b, e);
    });
  }
}

}  // namespace batchnorm::cpu
