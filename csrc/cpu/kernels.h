// The CPU kernel table: the SIMD primitives every CPU op is built from, compiled once per ISA
// level and dtype (cpu/kernels.cpp) and chosen at run time (cpu/isa.cpp). Primitives work on one fixed
// block of a reduction so that the blocking, and hence every rounding, is independent of
// the thread count and of the ISA level: results are bitwise identical everywhere.
#pragma once
#include <cstdint>
#include <numeric>

#include "core/layout.h"
#include "core/recipes.h"
#include "cpu/convert.h"

namespace batchnorm::cpu {

// Values per block of a channels-first reduction: small enough that the block's second pass
// reads it from L1.
constexpr int64_t kPiece = 8192;
// Channels per call of the block primitives (moments_channels, grad_sums_channels): their
// accumulators, 3 x 4 vectors per channel, stay in L1.
constexpr int64_t kBlockChannels = 16;
// Bytes of a run of short planes back to back (one outer index of a block of channels) that
// a streamed pass of its own (map_run_streams) takes at least. kBlockChannels 7x7 planes are
// 3136 bytes in float32 but 1568 in a half type, and runs that short, C planes apart, are too
// short for the prefetchers to follow. Intel Xeon (model 207), 256x2048x7x7 NCHW inference
// from memory, in-process A/B against runs of kBlockChannels: bfloat16 0.79x the time at 1
// thread, 0.81x at 2; float16 0.79x, 0.78x (float32, whose runs were already 3136 bytes,
// unchanged). Longer runs gained nothing (6272 bytes: 0.93-1.03x of these), and runs that
// leave a line's end to the next run lost (4116-byte float32 runs 1.12-1.13x, 6174-byte
// bfloat16 ones 1.07x): stream_run_channels keeps runs whole lines where it can.
constexpr int64_t kStreamRunBytes = 3072;
// The channels of such a run of planes of plane_bytes bytes: kBlockChannels, or the fewest that
// make kStreamRunBytes in a whole number of cache lines (a multiple of run_line_channels) where
// those are at most twice that, else the fewest that make it. Either way a run is at most
// 2 * kStreamRunBytes, or kBlockChannels planes.
BN_CPU_INLINE int64_t run_line_channels(int64_t plane_bytes) { return 64 / std::gcd(plane_bytes, int64_t(64)); }
BN_CPU_INLINE int64_t stream_run_channels(int64_t plane_bytes) {
  const int64_t unit = run_line_channels(plane_bytes);
  const int64_t want = (kStreamRunBytes + plane_bytes - 1) / plane_bytes;
  const int64_t lines = (want + unit - 1) / unit * unit;
  const int64_t c = lines * plane_bytes <= 2 * kStreamRunBytes ? lines : want;
  return c > kBlockChannels ? c : kBlockChannels;
}
// Planes of at most this many values (a 7x7 one, 49) are small: the kernels walk their rows
// across a block of channels, and the plan sizes blocks for that (plan.h).
constexpr int64_t kSmallPlane = 64;
// Positions per run of a channels-last reduction (reduced in float, merged in double): at
// most 256, and few enough that a run's values stay in L2 for its second pass, yet long
// enough that the per-run double merges of every channel cost little.
constexpr int64_t kChannelsLastRun = 256;
constexpr int64_t kChannelsLastRunBytes = 256 << 10;
BN_CPU_INLINE int64_t channels_last_run(int64_t channels, int64_t value_bytes) {
  const int64_t fit = kChannelsLastRunBytes / (channels * value_bytes);
  return fit < 8 ? 8 : fit > kChannelsLastRun ? kChannelsLastRun : fit;
}
// Streamed channels-last rows (one position's channels) narrower than kPeelRowBytes, and
// misaligned ones narrower than kFlatRowBytes, go as one flat run when the positions lie back
// to back; rows that do not go flat go position by position, and there an output whose
// positions share one misalignment, in rows of at least kPeelRowBytes, has each row's first
// values written one by one (map_positions, which has the figures).
constexpr int64_t kFlatRowBytes = 2048;
constexpr int64_t kPeelRowBytes = 1024;
static_assert(kFlatRowBytes >= kPeelRowBytes, "misaligned rows go flat up to the wider bound");
// Channels-last rows in cache that lie back to back go as one flat run: rows of any width where
// a vector is one 64-byte register (AVX-512 float32/float64), rows of at most this many vectors
// elsewhere (map_positions has the figures).
constexpr int64_t kHotFlatVectors = 8;
// Channels-last rows whose width is not a whole number of vectors go flat when their
// coefficients repeat within this many vectors (lcm(C, lanes): 3 for 24 float channels, 7 for
// 7); wider periods go position by position, the row's last channels in one partial vector.
// Both had been value by value. AMD EPYC Zen 4, tools/ab_lib, in-process, both orders, 1
// thread in cache unless stated: inference 256x24x32x32 NHWC float32 0.68-0.73x the time,
// bfloat16 0.29-0.32x, 7 channels float16 (2 threads, from memory) 0.26-0.30x, 40 channels
// bfloat16 (the same) 0.62-0.67x, 4099x11 0.61x; fused backward 256x40x16x16 bfloat16 0.31x;
// training 0.88-0.89x; AVX2 float32 0.77-0.78x, bfloat16 0.51x; 4096x1000 (a 2000-value period:
// per position, the partial vector) 0.91-0.95x.
constexpr int64_t kFlatPatternVectors = 64;
// Bytes ahead that half types' streamed channels-last maps prefetch their inputs where they go
// position by position (map_positions; the flat runs do not).
constexpr int64_t kMapPrefetchBytes = 1024;
// Streamed channels-first rows shorter than this, from memory and walked a channel at a time
// (map_block through map_channels), prefetch kPrefetchRows rows ahead (see map_channels).
constexpr int64_t kMapRowPrefetchBytes = 512;
// Positions per group at least, channels-last.
constexpr int64_t kChannelsLastMinGroup = 64;
// Every reduction is cut into at most this many groups (its unit of parallelism), by a
// rule that depends on the shape alone.
constexpr int64_t kMaxGroups = 64;

// The elementwise recipes (core/recipes.h) the map primitives run, and their input counts.
// Arrays in the layout's walk: the inputs in this order, then the output.
enum class MapKind : int {
  normalize,           // (x) -> y, coefficients {mean, scale, shift}
  normalize_relu,      // (x) -> relu(y)
  normalize_add,       // (x, residual) -> y + residual
  normalize_add_relu,  // (x, residual) -> relu(y + residual)
  backward_dx,         // (dy, x) -> dx, coefficients {mean, scale, mean_dy, proj}
  relu_grad,           // (dy, y) -> dy where y > 0, else 0; no coefficients
  copy,                // (x) -> x
  add,                 // (a, b) -> a + b; no coefficients
};
constexpr int kMapKinds = 8;
BN_CPU_INLINE int map_inputs(MapKind kind) {
  return kind == MapKind::normalize || kind == MapKind::normalize_relu || kind == MapKind::copy ? 1 : 2;
}
BN_CPU_INLINE int map_coefficients(MapKind kind) {
  return kind == MapKind::backward_dx                                                  ? 4
         : kind == MapKind::relu_grad || kind == MapKind::copy || kind == MapKind::add ? 0
                                                                                        : 3;
}

// `nt` (non-temporal stores) is set by the drivers for outputs that cannot stay in cache.
// Array roles in the layout's walk: forward (x, y); backward (dy, x, dx).
template <class T>
struct Kernels {
  using A = acc_t<T>;
  // Channels-first primitives: one channel (pointers at its first value), values
  // [begin, end) of its row-major walk over the reduced dims.
  Moments<double> (*moments)(const T* x, const Layout& L, int64_t begin, int64_t end);
  // moments of nc channels (channel i at x + i * L.channel_stride[0]) into out[0..nc).
  void (*moments_channels)(const T* x, const Layout& L, int64_t nc, int64_t begin, int64_t end,
                           Moments<double>* out);
  // map_channels[kind]: out = recipe(k, in...) over values [begin, end) of nc channels (channel
  // i's arrays at in[j] + i * L.channel_stride[j], out + i * L.channel_stride[N]; coefficient j
  // at k[j][i]; one channel is nc = 1), short rows walked row by row across the channels; with
  // `nt` the data come from memory, and those walks fetch rows ahead (Plan::from_memory);
  // `cold`: the inputs come from memory too (a pass of its own, not one right after a
  // reduction over the same block), and short planes' runs go as streams (map_run_streams).
  void (*map_channels[kMapKinds])(const T* const* in, T* out, const Layout& L, int64_t nc, int64_t begin,
                                  int64_t end, const A* const* k, bool nt, bool cold);
  void (*grad_sums)(const T* dy, const T* x, const Layout& L, int64_t begin, int64_t end, A mean,
                    double* sum_dy, double* sum_dy_xmu);
  // grad_sums of nc channels (channel i at dy + i * L.channel_stride[0], x + i *
  // L.channel_stride[1], its mean at mean[i]) into sum_dy[0..nc), sum_dy_xmu[0..nc).
  void (*grad_sums_channels)(const T* dy, const T* x, const Layout& L, int64_t nc, int64_t begin, int64_t end,
                             const A* mean, double* sum_dy, double* sum_dy_xmu);
  // Channels-last primitives: every channel of positions [p0, p1). `scratch` holds 3*C A's.
  // A call may take a range of a wider row's channels (L.channels of them, pointers at the
  // first): each channel's operations do not depend on its neighbours, so a range that starts
  // at a multiple of 64 channels gets the bits of the whole row, given the runs of positions
  // the whole row takes (`run`: channels_last_run of its width).
  void (*cl_moments)(const T* x, const Layout& L, int64_t p0, int64_t p1, int64_t run, Moments<double>* out,
                     A* scratch);
  // out = recipe over every channel of positions [p0, p1); k[j]: the (C,) values of coefficient j.
  void (*cl_map[kMapKinds])(const T* const* in, T* out, const Layout& L, int64_t p0, int64_t p1,
                            const A* const* k, bool nt);
  void (*cl_grad_sums)(const T* dy, const T* x, const Layout& L, int64_t p0, int64_t p1, const A* mean,
                       double* sum_dy, double* sum_dy_xmu, A* scratch);
  // The per-channel finalize of n channels (kernels/finalize.h): forward_coefficients into
  // (mean, invstd, scale, shift); param_grads into (dweight, dbias) and backward_coefficients
  // into (k_mean, k_scale, k_mean_dy, k_proj).
  void (*forward_finalize)(int64_t n, const double* mean, const double* var, double eps, const A* weight,
                           const A* bias, A* mean_out, A* invstd, A* scale, A* shift);
  void (*backward_finalize)(int64_t n, const double* sum_dy, const double* sum_dy_xmu, double count, const A* mean,
                            const A* invstd, const A* weight, A* dweight, A* dbias, A* k_mean, A* k_scale,
                            A* k_mean_dy, A* k_proj);
};

struct KernelTable {
  const char* name;
  Kernels<float16> f16;
  Kernels<bfloat16> bf16;
  Kernels<float> f32;
  Kernels<double> f64;
};

// The table of the best ISA level this CPU supports (BATCHNORM_ISA=baseline|avx2|avx512|
// avx512_bf16 lowers it, for testing and for comparing levels).
const KernelTable& active_kernels();

template <class T> const Kernels<T>& kernels_for();
template <> inline const Kernels<float16>& kernels_for<float16>() { return active_kernels().f16; }
template <> inline const Kernels<bfloat16>& kernels_for<bfloat16>() { return active_kernels().bf16; }
template <> inline const Kernels<float>& kernels_for<float>() { return active_kernels().f32; }
template <> inline const Kernels<double>& kernels_for<double>() { return active_kernels().f64; }

}  // namespace batchnorm::cpu
