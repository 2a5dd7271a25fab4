// The streaming threshold's probe: whether, on this machine, regular stores into an array held
// beyond one core's L2 take longer than non-temporal ones even where the cache keeps that array
// (cpu/plan.h says how the threshold uses it). Measured once per process, on first need.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <new>

#include "cpu/plan.h"

#if defined(__x86_64__) && defined(__GNUC__)  // GCC and clang: SSE2 intrinsics and asm
#include <emmintrin.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
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
  // dst is never read: without this a compiler may drop the stores to it.
  asm volatile("" : : "r"(dst) : "memory");
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Buffers on 2 MiB boundaries, on huge pages where the kernel gives them: mapping 24 MiB in
// 4 KiB pages took most of the probe's time (some 20 ms on the Intel Xeon VM).
constexpr size_t kBufferAlign = size_t(2) << 20;
struct AlignedFree {
  void operator()(void* p) const { ::operator delete[](p, std::align_val_t(kBufferAlign)); }
};
using Buffer = std::unique_ptr<void, AlignedFree>;
Buffer buffer(int64_t bytes) {
  Buffer b(::operator new[](static_cast<size_t>(bytes), std::align_val_t(kBufferAlign), std::nothrow));
  if (!b) return b;
#if defined(MADV_HUGEPAGE)
  madvise(b.get(), static_cast<size_t>(bytes), MADV_HUGEPAGE);  // a hint: refused, 4 KiB pages
#endif
  std::memset(b.get(), 1, static_cast<size_t>(bytes));  // every page mapped before timing
  return b;
}

double measure() {
  // Arrays of 4 L2s each (1-16 MiB): past one core's L2, well inside any last-level cache that
  // could hold them. Each kind of store writes its own array, so the regular pass finds its
  // output where its last pass left it, in the cache if the cache holds it (a non-temporal
  // store evicts the line it writes: after one, a regular pass would pay the read of every
  // line from memory, and regular stores would lose everywhere).
  const int64_t bytes = std::clamp<int64_t>(4 * l2_cache_bytes(), int64_t(1) << 20, int64_t(16) << 20);
  const int64_t n = bytes / 16;
  Buffer src = buffer(bytes), regular_out = buffer(bytes), streamed_out = buffer(bytes);
  if (!src || !regular_out || !streamed_out) return 0;
  const auto* in = static_cast<const __m128i*>(src.get());
  auto* to_regular = static_cast<__m128i*>(regular_out.get());
  auto* to_streamed = static_cast<__m128i*>(streamed_out.get());
  // In blocks of one kind, twice each, the first pass of a block untimed: strictly alternating,
  // a streamed pass would be timed while the regular pass before it wrote its dirty lines back.
  // The fastest of the timed passes: a busy neighbour can only slow a pass down.
  double regular = 1e30, streamed = 1e30;
  for (int block = 0; block < 4; ++block) {
    const bool nt = block % 2 == 1;
    for (int pass = 0; pass < 3; ++pass) {
      const double t = timed_pass(nt ? to_streamed : to_regular, in, n, nt);
      if (pass > 0) (nt ? streamed : regular) = std::min(nt ? streamed : regular, t);
    }
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
