/* A standalone model of what 4 KB pages cost a streaming pass against transparent huge pages,
 * and what one prefetch per page, a few pages ahead, gives back (the page touches of
 * csrc/cpu/kernels/map.h): one thread, float32 arrays of BYTES each, a 64 MB scrub before
 * every timed pass, medians of 25.
 *
 *   cc -O2 -mavx512f -o page_walks bench/page_walks.c && ./page_walks [BYTES]
 *
 * Passes: a read (sum); the read with one prefetcht2 per page 8 or 32 KB on; a map with
 * streamed stores (y = 2x), without and with the page touch of x and y; the same map with
 * regular stores. Each on 4 KB pages (madvise MADV_NOHUGEPAGE) and on huge pages
 * (MADV_HUGEPAGE; the kernel's THP mode must allow madvise). On the AMD EPYC Zen 4 VM
 * (session 34, 24-25 MB arrays): the read 15-19 GB/s on 4 KB pages against 28-34 GB/s on huge
 * pages; the regular-store map 2.95-3.09 ms against 1.86-2.04 ms, 0.82-0.85x the time with the
 * touch; the streamed map 1.9-2.1 ms against 1.4 ms, level with the touch here. The read's
 * touch moved with the VM's state: 0.70-0.77x the time (32 KB ahead; 23-28 GB/s) in the
 * session's first model runs, 0.93-1.08x in the runs at this file's commit. (The library's
 * streamed short-plane map, 8 runs side by side, gained 0.85-0.90x in-process from touching
 * the next tile's pages: see kernels/map.h.) A prefetch per line made the read slower.  */
#define _GNU_SOURCE
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static float* array(size_t bytes, int huge) {
  const size_t align = (size_t)2 << 20, rounded = (bytes + align - 1) / align * align;
  float* p = aligned_alloc(align, rounded);
  if (p == NULL) exit(1);
  madvise(p, rounded, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  memset(p, 1, bytes);
  return p;
}

static int by_value(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

volatile float sink;

/* ahead == 0: no touch. */
static void read_pass(const float* x, long n, long ahead) {
  __m512 s = _mm512_setzero_ps(), t = s;
  for (long i = 0; i < n; i += 32) {
    if (ahead && (i & 1023) == 0) _mm_prefetch((const char*)(x + i + ahead), _MM_HINT_T2);
    s = _mm512_add_ps(s, _mm512_load_ps(x + i));
    t = _mm512_add_ps(t, _mm512_load_ps(x + i + 16));
  }
  sink = _mm512_reduce_add_ps(_mm512_add_ps(s, t));
}

static void map_pass(const float* x, float* y, long n, long ahead, int streamed) {
  for (long i = 0; i < n; i += 16) {
    if (ahead && (i & 1023) == 0) {
      _mm_prefetch((const char*)(x + i + ahead), _MM_HINT_T2);
      _mm_prefetch((const char*)(y + i + ahead), _MM_HINT_T2);
    }
    const __m512 v = _mm512_mul_ps(_mm512_load_ps(x + i), _mm512_set1_ps(2));
    if (streamed) _mm512_stream_ps(y + i, v);
    else _mm512_store_ps(y + i, v);
  }
  if (streamed) _mm_sfence();
}

int main(int argc, char** argv) {
  const long bytes = argc > 1 ? atol(argv[1]) : 25690112, n = bytes / 4 / 1024 * 1024;
  const int reps = 25;
  char* scrub = malloc(64 << 20);
  memset(scrub, 0, 64 << 20);
  printf("%ld MB arrays, 1 thread, median of %d after a 64 MB scrub\n", bytes >> 20, reps);
  for (int huge = 0; huge < 2; ++huge) {
    float *x = array(n * 4, huge), *y = array(n * 4, huge);
    const char* names[] = {"read", "read, touch 8 KB ahead", "read, touch 32 KB ahead", "streamed map",
                           "streamed map, touch 8 KB ahead", "streamed map, touch 32 KB ahead", "regular map",
                           "regular map, touch 8 KB ahead"};
    for (int pass = 0; pass < 8; ++pass) {
      double t[64];
      for (int r = 0; r < reps; ++r) {
        for (long i = 0; i < (64 << 20); i += 64) scrub[i]++;
        const double t0 = now();
        switch (pass) {
          case 0: read_pass(x, n, 0); break;
          case 1: read_pass(x, n, 2048); break;
          case 2: read_pass(x, n, 8192); break;
          case 3: map_pass(x, y, n, 0, 1); break;
          case 4: map_pass(x, y, n, 2048, 1); break;
          case 5: map_pass(x, y, n, 8192, 1); break;
          case 6: map_pass(x, y, n, 0, 0); break;
          default: map_pass(x, y, n, 2048, 0); break;
        }
        t[r] = now() - t0;
      }
      qsort(t, reps, sizeof(double), by_value);
      const double moved = (pass < 3 ? 1 : 2) * (double)n * 4;
      printf("%-10s %-32s %7.3f ms %6.1f GB/s\n", huge ? "huge pages" : "4 KB pages", names[pass], t[reps / 2] * 1e3,
             moved / t[reps / 2] / 1e9);
    }
  }
  return 0;
}
