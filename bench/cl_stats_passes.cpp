// Standalone model of the channels-last statistics' two passes (kernels/moments.h, cl_moments)
// over an (N, C) float32 array, AVX2, one thread: where their time goes, apart from the library.
// Per run of R positions: pass 1 sums the run in blocks of B positions across register tiles of
// 32 channels (four ymm), parking the sums between blocks; pass 2 sums the deviations from the
// run's mean and their squares down register tiles of `tile` ymm, the run then in L2.
//
//   g++ -O2 -mavx2 -mfma -o cl_stats_passes bench/cl_stats_passes.cpp
//   ./cl_stats_passes N C [R B]        R: positions per run (default: the library's, 256 KB),
//                                      B: pass 1's block (default 8 for rows of 4 KB+, else 1)
//
// Prints milliseconds and GB/s of pass 1 alone and of both passes, and the time of pass 2 alone
// over one L2-resident run, for pass-2 tiles of 2, 4 and 8 ymm (the library's AVX2 tile is 8:
// four 16-float vectors). Medians of 60 calls, x in cache after the first (16 MB stays in a
// 32 MiB L3). A model for rows wider than 32 channels: the library walks narrower rows (up to
// 64 float32 channels) in one tile without parking. The library itself: tools/ab_lib.c.
// Session 28, AMD EPYC Zen 3 at 3.2 GHz, 4096x1024: pass 1 alone 0.29-0.51 ms, both passes
// 0.84-1.13 ms (the library's statistics 1.1-1.2 ms); pass 2 on one run about 1 ns (3-4
// cycles) a ymm at 1024 channels (rows of 4 KB) whatever the tile, 0.6-0.7 ns with 2-ymm tiles
// at 512 or 1088 channels (8-ymm 0.9), against the 0.47 ns (1.5 cycles) its three float adds a
// ymm allow on two add pipes. 2-ymm tiles in the library itself were level (4 to 1 vectors).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

// Pass 1 over positions [r0, r1): sums of each channel, blocks of B positions, parked in `park`.
void pass1(const float* x, long C, long r0, long r1, long B, float* park) {
  for (long p0 = r0; p0 < r1; p0 += B) {
    const long p1 = std::min(r1, p0 + B);
    for (long c0 = 0; c0 + 32 <= C; c0 += 32) {
      __m256 a[4];
      for (int k = 0; k < 4; ++k) a[k] = p0 == r0 ? _mm256_setzero_ps() : _mm256_loadu_ps(park + c0 + 8 * k);
      for (long i = p0; i < p1; ++i)
        for (int k = 0; k < 4; ++k) a[k] = _mm256_add_ps(a[k], _mm256_loadu_ps(x + i * C + c0 + 8 * k));
      for (int k = 0; k < 4; ++k) _mm256_storeu_ps(park + c0 + 8 * k, a[k]);
    }
  }
}

// Pass 2 over positions [r0, r1): deviations from mean = park / n and their squares, tiles of NV ymm.
template <int NV>
void pass2(const float* x, long C, long r0, long r1, const float* park, float* dev, float* sq) {
  const __m256 inv = _mm256_set1_ps(1.0f / static_cast<float>(r1 - r0));
  for (long c0 = 0; c0 + 8 * NV <= C; c0 += 8 * NV) {
    __m256 m[NV], e[NV], q[NV];
    for (int k = 0; k < NV; ++k) {
      m[k] = _mm256_mul_ps(_mm256_loadu_ps(park + c0 + 8 * k), inv);
      e[k] = q[k] = _mm256_setzero_ps();
    }
    for (long i = r0; i < r1; ++i)
      for (int k = 0; k < NV; ++k) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i * C + c0 + 8 * k), m[k]);
        e[k] = _mm256_add_ps(e[k], d);
        q[k] = _mm256_add_ps(q[k], _mm256_mul_ps(d, d));
      }
    for (int k = 0; k < NV; ++k) {
      _mm256_storeu_ps(dev + c0 + 8 * k, e[k]);
      _mm256_storeu_ps(sq + c0 + 8 * k, q[k]);
    }
  }
}

template <class F>
double median_ms(F&& f) {
  std::vector<double> t;
  for (int r = 0; r < 61; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    if (r > 0) t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s N C [R B]   (C a multiple of 64)\n", argv[0]);
    return 2;
  }
  const long N = std::atol(argv[1]), C = std::atol(argv[2]);
  const long R = argc > 3 ? std::atol(argv[3]) : std::clamp<long>((256 << 10) / (C * 4), 8, 256);
  const long B = argc > 4 ? std::atol(argv[4]) : (C * 4 >= 4096 ? 8 : 1);
  if (N <= 0 || C <= 0 || C % 64 != 0 || R <= 0 || B <= 0) {
    std::fprintf(stderr, "N, R, B must be positive and C a positive multiple of 64\n");
    return 2;
  }
  std::vector<float> xs(static_cast<size_t>(N * C) + 16), park(C), dev(C), sq(C);
  float* x = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(xs.data()) + 63) / 64 * 64);
  for (long i = 0; i < N * C; ++i) x[i] = static_cast<float>(i % 13) * 0.1f;
  const double mb = N * C * 4 / 1e6;
  auto runs = [&](auto each) {
    for (long r0 = 0; r0 < N; r0 += R) each(r0, std::min(N, r0 + R));
  };
  std::printf("%ldx%ld float32 (%.1f MB), runs of %ld positions, pass-1 blocks of %ld\n", N, C, mb, R, B);
  const double t1 = median_ms([&] { runs([&](long a, long b) { pass1(x, C, a, b, B, park.data()); }); });
  std::printf("  pass 1 alone          %7.3f ms  %6.1f GB/s\n", t1, mb / t1);
  auto both = [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    const double t = median_ms([&] {
      runs([&](long a, long b) {
        pass1(x, C, a, b, B, park.data());
        pass2<NV>(x, C, a, b, park.data(), dev.data(), sq.data());
      });
    });
    const long r1 = std::min(N, R);
    pass1(x, C, 0, r1, B, park.data());
    const double t2 = median_ms([&] { for (int j = 0; j < 20; ++j) pass2<NV>(x, C, 0, r1, park.data(), dev.data(), sq.data()); }) / 20;
    const double ymm = static_cast<double>(r1) * C / 8;
    std::printf("  both, %d-ymm tiles     %7.3f ms  %6.1f GB/s   pass 2 on one run in L2: %6.1f GB/s, %.2f ns a ymm\n", NV, t,
                mb / t, r1 * C * 4 / 1e6 / t2, t2 * 1e6 / ymm);
  };
  both(std::integral_constant<int, 2>{});
  both(std::integral_constant<int, 4>{});
  both(std::integral_constant<int, 8>{});
  return 0;
}
