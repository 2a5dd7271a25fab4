// The streaming threshold's probe: whether, on this machine, regular stores into an array held
// beyond one core's L2 cost clearly more than non-temporal ones (cpu/plan.h says how the
// threshold uses it). Measured once per process, on first need.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <new>

#include "cpu/plan.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define BN_STORE_PROBE 1
#endif

namespace batchnorm::cpu {
namespace {
#if defined(BN_STORE_PROBE)
// One pass over `n` 16-byte vectors, dst = src + 1 (not a plain copy, which a compiler may turn
// into memcpy, whose string moves skip the read-for-ownership that regular stores pay), with
// regular or non-temporal stores; its seconds.
double timed_pass(__m128i* dst, const __m128i* src, int64_t n, bool streamed) {
  const __m128i one = _mm_set1_epi32(1);
  const auto t0 = std::chrono::steady_clock::now();
  if (streamed) {
    for (int64_t i = 0; i < n; ++i) _mm_stream_si128(dst + i, _mm_add_epi32(_mm_load_si128(src + i), one));
    _mm_sfence();
  } else {
    for (int64_t i = 0; i < n; ++i) _mm_store_si128(dst + i, _mm_add_epi32(_mm_load_si128(src + i), one));
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double measure() {
  // Two arrays of 2 L2s each (1-16 MiB): past one core's L2, well inside any last-level cache
  // that could hold them, where regular stores win wherever that cache pays them back.
  const int64_t bytes = std::clamp<int64_t>(2 * l2_cache_bytes(), int64_t(1) << 20, int64_t(16) << 20);
  const int64_t n = bytes / 16;
  std::unique_ptr<__m128i[]> src(new (std::nothrow) __m128i[n]), dst(new (std::nothrow) __m128i[n]);
  if (!src || !dst) return 0;
  std::memset(static_cast<void*>(src.get()), 1, bytes);  // every page mapped before timing
  std::memset(static_cast<void*>(dst.get()), 0, bytes);
  // Alternating, the first round a warm-up, the fastest of the rest: a busy neighbour can only
  // slow a pass down, and both kinds alike.
  double regular = 1e30, streamed = 1e30;
  for (int r = 0; r < 4; ++r) {
    const double a = timed_pass(dst.get(), src.get(), n, false);
    const double b = timed_pass(dst.get(), src.get(), n, true);
    if (r > 0) regular = std::min(regular, a), streamed = std::min(streamed, b);
  }
  return streamed / regular;
}
#endif
}  // namespace

double store_probe_ratio() {
#if defined(BN_STORE_PROBE)
  static const double ratio = measure();
  return ratio;
#else
  return 0;
#endif
}
}  // namespace batchnorm::cpu
