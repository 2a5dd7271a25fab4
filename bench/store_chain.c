/* A standalone model of the streaming-threshold question in plain passes (cpu/plan.h,
 * store_probe_ratio): an op's pass y = x + 1 with regular or non-temporal stores, timed alone
 * just after a producer's pass writing x (the store probe's passes have no producer between
 * them) and inside a chain of the producer's pass, the op's and a consumer's pass reading y
 * into z, each array BYTES (default 2 MiB, the probe's 4 L2s of the
 * AMD EPYC Zen 3 VM), on huge pages where the kernel gives them; one thread, blocks of one
 * kind of store, the first chain of a block untimed, the fastest of the rest.
 *
 *   cc -O2 -o store_chain bench/store_chain.c && ./store_chain [BYTES]
 *
 * Prints op-only and chain ratios, streamed time / regular time (< 1: streaming wins). On the
 * 2-vCPU AMD EPYC Zen 3 VM (32 MiB L3, 512 KiB L2 each; session 55, six runs at 2 MiB): chain
 * 1.19-1.29, op-only 1.05-1.14 (the library's probe, whose passes have no producer between
 * them, read 0.63-0.86 there); at 8 and 16 MiB arrays, five of which the L3 cannot hold, chain
 * 0.90 and 1.01.  */
#define _GNU_SOURCE
#include <emmintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* dst = src + 1 over n 16-byte vectors (not a copy, which a compiler may make a memcpy). */
__attribute__((noinline)) static void pass(__m128i* dst, const __m128i* src, long n, int nt) {
  const __m128i one = _mm_set1_epi32(1);
  if (nt) {
    for (long i = 0; i < n; ++i) _mm_stream_si128(dst + i, _mm_add_epi32(_mm_load_si128(src + i), one));
    _mm_sfence();
  } else {
    for (long i = 0; i < n; ++i) _mm_store_si128(dst + i, _mm_add_epi32(_mm_load_si128(src + i), one));
  }
  __asm__ volatile("" : : "r"(dst) : "memory");
}

static __m128i* array(long bytes) {
  void* p = NULL;
  if (posix_memalign(&p, 2 << 20, bytes) != 0) exit(1);
  madvise(p, bytes, MADV_HUGEPAGE);
  memset(p, 1, bytes);
  return p;
}

int main(int argc, char** argv) {
  const long bytes = argc > 1 ? atol(argv[1]) : 2 << 20, n = bytes / 16;
  __m128i *a = array(bytes), *x = array(bytes), *y_regular = array(bytes), *y_streamed = array(bytes),
          *z = array(bytes);
  double op[2] = {1e30, 1e30}, chain[2] = {1e30, 1e30};
  for (int block = 0; block < 4; ++block) {
    const int nt = block % 2;
    __m128i* y = nt ? y_streamed : y_regular;  /* each kind its own output, as in the probe */
    for (int rep = 0; rep < 3; ++rep) {
      pass(x, a, n, 0);
      const double t0 = now();
      pass(y, x, n, nt);
      const double t1 = now();
      pass(z, y, n, 0);
      const double t2 = now();
      pass(x, a, n, 0);
      pass(y, x, n, nt);
      pass(z, y, n, 0);
      const double t3 = now();
      if (rep > 0) {
        if (t1 - t0 < op[nt]) op[nt] = t1 - t0;
        if (t3 - t2 < chain[nt]) chain[nt] = t3 - t2;
      }
    }
  }
  printf("%6ld KB  op-only %.3f (regular %.0f us, streamed %.0f us)  chain %.3f (regular %.0f us, streamed %.0f us)\n",
         bytes >> 10, op[1] / op[0], op[0] * 1e6, op[1] * 1e6, chain[1] / chain[0], chain[0] * 1e6, chain[1] * 1e6);
  return 0;
}
