// Portable SIMD for the kernels: 64-byte GCC/Clang vector types (one zmm under AVX-512, two
// ymm under AVX2, four xmm at baseline), loads that convert any storage type to the
// accumulation type, rounding stores, and non-temporal stores for outputs that will not fit
// in cache. Each lane is plain IEEE arithmetic, so every ISA level computes the same bits.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "core/recipes.h"
#include "cpu/convert.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace batchnorm::cpu::BN_ISA {

template <class A> struct vec_of;
template <> struct vec_of<float> { typedef float type __attribute__((vector_size(64))); };
template <> struct vec_of<double> { typedef double type __attribute__((vector_size(64))); };
template <class A> using vec_t = typename vec_of<A>::type;
template <class A> constexpr int vlen = 64 / sizeof(A);

// The lanes of v added pairwise in one fixed order: lane j + lane j + N/2 for the lower half,
// halving down to one lane, each level one vector add of halves. Written over lanes in an
// array (stored, then read back narrower), GCC's code stalled on store forwarding: a sum of
// 32 float lanes took a fifth of a 196-value channel's backward (AVX2). The same additions.
template <class V>
static inline __attribute__((always_inline)) auto sum_halves(const V& v) {
  using E = std::remove_cv_t<std::remove_reference_t<decltype(v[0])>>;
  if constexpr (sizeof(V) == sizeof(E)) {
    return v[0];
  } else {
    typedef E H __attribute__((vector_size(sizeof(V) / 2)));
    H lo, hi;
    std::memcpy(&lo, &v, sizeof(H));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
    return sum_halves(lo + hi);
  }
}

// A loop-carried accumulator of vlen<A> lanes. GCC keeps a 64-byte vector that lives across
// loop iterations in memory when the ISA's registers are narrower (AVX2, SSE2), and moves it
// through general registers at every step (4096x1024 channels-last statistics ran at 1.6
// GB/s on one AVX2 core); held as register-wide parts it stays in registers. Lane for lane
// the same additions in the same order, so the same bits at every ISA level.
template <class A, bool kShuffleSplit = false>
struct Acc {
#if defined(__AVX512F__)
  static constexpr int kParts = 1;
#elif defined(__AVX__)
  static constexpr int kParts = 2;
#else
  static constexpr int kParts = 4;
#endif
  typedef A part __attribute__((vector_size(64 / kParts)));
  // Only the parts the ISA uses: unused ones kept as zero vectors doubled every accumulator
  // under AVX2, and the blocks' arrays of accumulators, kept in memory, are zeroed per call
  // (16 channels of a 7x7 float32 row block: 24 KB per call instead of 12). Parts beyond
  // kParts are named through this-> only, in branches taken when they exist.
#if defined(__AVX512F__)
  part p0{};
#elif defined(__AVX__)
  part p0{}, p1{};
#else
  part p0{}, p1{}, p2{}, p3{};
#endif
  static inline __attribute__((always_inline)) void split(const vec_t<A>& v, part (&q)[kParts]) {
    if constexpr (kShuffleSplit && kParts == 2) {
      split_regs(v, q, std::make_index_sequence<kParts>{});  // core/recipes.h
    } else {
      std::memcpy(q, &v, sizeof(v));
    }
  }
  inline __attribute__((always_inline)) Acc& operator+=(const vec_t<A>& v) {
    part q[kParts];
    split(v, q);
    p0 += q[0];
    if constexpr (kParts > 1) this->p1 += q[1];
    if constexpr (kParts > 2) {
      this->p2 += q[2];
      this->p3 += q[3];
    }
    return *this;
  }
  // += f(v...), with f run on each register-wide part of its arguments when they are split by
  // shuffles: a 64-byte intermediate of joined halves used twice was built lane by lane on
  // the stack (float16 backward under AVX2). Lane for lane the same operations.
  template <class F, class... Vs>
  inline __attribute__((always_inline)) Acc& add_of(F&& f, const Vs&... v) {
    if constexpr (kShuffleSplit && kParts == 2) {
      static_assert(vlen<A> == 16, "shuffle split: float lanes");
      p0 += f(part(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7))...);
      this->p1 += f(part(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15))...);
      return *this;
    } else {
      return *this += f(v...);
    }
  }
  // The sum of the lanes of these parts (the lanes of parts i and i + n/2 added first, as
  // sum_halves orders them): parts of a Lanes2 pair already added, or of one accumulator.
  static inline __attribute__((always_inline)) A total_of(part (&q)[kParts]) {
#pragma GCC unroll 4
    for (int w = kParts / 2; w >= 1; w /= 2)
#pragma GCC unroll 4
      for (int j = 0; j < w; ++j) q[j] = q[j] + q[j + w];
    return sum_halves(q[0]);
  }
  inline __attribute__((always_inline)) void parts(part (&q)[kParts]) const {
    q[0] = p0;
    if constexpr (kParts > 1) q[1] = this->p1;
    if constexpr (kParts > 2) {
      q[2] = this->p2;
      q[3] = this->p3;
    }
  }
  inline __attribute__((always_inline)) A total() const {
    part q[kParts];
    parts(q);
    return total_of(q);
  }
  // The lanes of this and b as one row of 2 * vlen<A> lanes, in the same order: lane j of
  // this plus lane j of b first.
  inline __attribute__((always_inline)) A total_with(const Acc& b) const {
    part q[kParts], r[kParts];
    parts(q);
    b.parts(r);
#pragma GCC unroll 4
    for (int i = 0; i < kParts; ++i) q[i] = q[i] + r[i];
    return total_of(q);
  }
  // An accumulator holding v (get() of a parked accumulator): the same state, bit for bit.
  static inline __attribute__((always_inline)) Acc of(const vec_t<A>& v) {
    Acc r;
    part q[kParts];
    split(v, q);
    r.p0 = q[0];
    if constexpr (kParts > 1) r.p1 = q[1];
    if constexpr (kParts > 2) {
      r.p2 = q[2];
      r.p3 = q[3];
    }
    return r;
  }
  inline __attribute__((always_inline)) vec_t<A> get() const {
    part q[kParts];
    parts(q);
    vec_t<A> v;
    std::memcpy(&v, q, sizeof(v));
    return v;
  }
  // The lanes of get() stored to p[0, vlen<A>), and the accumulator holding them back. Under
  // AVX2 part by part: through get() GCC 12 joined the two parts on the stack first (each
  // stored twice, one reloaded), in channels-last runs that park their sums at every position
  // (kernels/moments.h). AMD EPYC Zen 3, in-process, both orders: statistics in cache, 1
  // thread, 8192x512 float32 0.85-0.90x the time, 64x256x28x28 NHWC 0.90-0.91x (float16
  // 0.78x, bfloat16 0.92-0.93x), from memory on 2 threads 0.92-0.94x; backward 8192x512
  // 0.93-0.97x.
  // The baseline level's four parts went 1.03-1.05x slower so: they keep get(). Same lanes.
  inline __attribute__((always_inline)) void park(A* p) const {
    if constexpr (kParts == 2) {
      std::memcpy(p, &p0, sizeof(part));
      std::memcpy(p + vlen<A> / 2, &this->p1, sizeof(part));
    } else {
      const vec_t<A> v = get();
      std::memcpy(p, &v, sizeof(v));
    }
  }
  static inline __attribute__((always_inline)) Acc resume(const A* p) {
    if constexpr (kParts == 2) {
      Acc r;
      std::memcpy(&r.p0, p, sizeof(part));
      std::memcpy(&r.p1, p + vlen<A> / 2, sizeof(part));
      return r;
    } else {
      vec_t<A> v;
      std::memcpy(&v, p, sizeof(v));
      return of(v);
    }
  }
};

// The accumulator for values loaded from storage type T. float16 under AVX2 + F16C loads as
// two converted halves joined by a shuffle (loadv); split back by shuffles GCC 12 folds the
// pair away, whereas through memcpy it spilled the joined vector lane by lane (32x64x56x56
// float16 training ran at a fifth of float32's speed). Every other type converts at full
// width, which the memcpy split takes apart for free (shuffles there cost bfloat16 15%).
template <class T>
constexpr bool joined_halves() {
#if defined(__F16C__) && defined(__AVX__) && !defined(__AVX512F__)
  return std::is_same_v<T, float16>;
#else
  return false;
#endif
}
template <class T>
using AccFor = Acc<acc_t<T>, joined_halves<T>()>;

// v in every lane, as 0 + v (so -0 becomes +0, the bits every version has had). Written as
// an initializer list: GCC lowers that to one broadcast, whereas `vec_t<A>{} + v` on vectors
// wider than the ISA's registers went lane by lane through the stack in the per-row kernels
// (16 scalar stores, then wide loads that cannot be forwarded: the 256x2048x7x7 inference
// regression of the recipe executor).
template <class A, std::size_t... I>
static inline __attribute__((always_inline)) vec_t<A> splat_lanes(A v, std::index_sequence<I...>) {
  return vec_t<A>{((void)I, v)...};
}
template <class A>
static inline __attribute__((always_inline)) vec_t<A> splat(A v) {
  return splat_lanes<A>(A(0) + v, std::make_index_sequence<vlen<A>>{});
}

#if defined(__AVX512F__)
// 16 words of half type T (bfloat16 or float16) as float lanes, exactly: bfloat16 by widening
// each word into a lane's high half, float16 by the conversion instruction. loadv's and
// load_partial's.
template <class T>
static inline __attribute__((always_inline)) vec_t<float> widen_half_words(__m256i h) {
  vec_t<float> v;
  if constexpr (std::is_same_v<T, bfloat16>) {
    const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
    std::memcpy(&v, &w, sizeof(v));
  } else {
    const __m512 f = _mm512_cvtph_ps(h);
    std::memcpy(&v, &f, sizeof(v));
  }
  return v;
}
// The mask register of lanes [0, n), 0 <= n < 16 (masked partial loads and stores).
static inline __attribute__((always_inline)) __mmask16 lanes_below_mask(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1);
}
#endif

// Vectors of storage type T (vlen<acc_t<T>> values) to a 64-byte cache line: 1 for float32
// and float64, 2 for the half types. The unit of streaming stores (whole lines) and of the
// reductions' prefetches (a line per line read).
template <class T>
constexpr int line_vectors = 64 / (vlen<acc_t<T>> * static_cast<int>(sizeof(T)));
static_assert(line_vectors<float> == 1 && line_vectors<double> == 1, "a vector is a line");

// vlen<acc_t<T>> values of storage type T from p, in the accumulation type.
template <class T>
static inline __attribute__((always_inline)) vec_t<acc_t<T>> loadv(const T* p) {
  using A = acc_t<T>;
  vec_t<A> v;
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(&v, p, sizeof(v));
  } else if constexpr (std::is_same_v<T, bfloat16>) {
#if defined(__AVX512F__)
    // One widening load (vpmovzxwd to a zmm); GCC 12's generic widening took two ymm halves.
    // (A zero-masking vpermw from the ymm instead was 3-5% faster on the Xeon in L2-resident
    // statistics, but its cost on AMD's AVX-512 cores is unmeasured: not done.)
    v = widen_half_words<T>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX2__)
    // Each 16-byte half widened from memory (vpmovzxwd ymm, m128) and shifted. GCC 12's generic
    // widening loaded the 32 bytes twice and split off the upper half (vmovdqu, vextracti128).
    // Joined through a union: a __builtin_shufflevector of the two halves instead made GCC build
    // the vector lane by lane on the stack in some kernels (statistics 1.75x the time). AMD
    // EPYC Zen 3, in-process, both orders: statistics 64x2048x7x7 hot, 1 thread, 0.89-0.94x
    // the time, 256x2048x7x7 from memory, 2 threads, 0.86-0.89x; training 256x2048x7x7 NCHW
    // 0.92-0.93x, 32x64x56x56 NHWC 0.88-0.91x; backward 32x64x56x56 NHWC 0.87-0.91x;
    // inference 32x64x56x56 NCHW 0.90-0.96x, NHWC level; 256x2048x7x7 from memory inference
    // NHWC and backward 1.01-1.04x (within the order effect).
    union {
      vec_t<A> whole;
      __m256i half[2];
    } u;
    u.half[0] = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
    u.half[1] = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p) + 1)), 16);
    v = u.whole;
#else
    typedef uint16_t h16 __attribute__((vector_size(32)));
    typedef uint32_t u32 __attribute__((vector_size(64)));
    h16 h;
    std::memcpy(&h, p, sizeof(h));
    const u32 w = __builtin_convertvector(h, u32) << 16;
    std::memcpy(&v, &w, sizeof(v));
#endif
  } else {
    // float16 -> float32 is exact; the conversion instruction where the level has it
    // (GCC 12 does not vectorize the generic _Float16 conversion).
#if defined(__AVX512F__)
    v = widen_half_words<T>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__) && defined(__AVX__)
    // Halves joined with a shuffle: through memcpy GCC 12 moved them via the stack and
    // general registers.
    typedef float f8 __attribute__((vector_size(32)));
    const f8 lo = (f8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const f8 hi = (f8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p) + 1));
    v = __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    typedef float16 f16 __attribute__((vector_size(32)));
    f16 h;
    std::memcpy(&h, p, sizeof(h));
    v = __builtin_convertvector(h, vec_t<A>);
#endif
  }
  return v;
}

// Non-temporal stores of 64 / 32 bytes to an aligned address, with the widest instruction the
// level has (stores only: no effect on any rounding).
static inline __attribute__((always_inline)) void stream64(void* p, const void* src) {
#if defined(__AVX512F__)
  _mm512_stream_si512(static_cast<__m512i*>(p), _mm512_loadu_si512(src));
#elif defined(__AVX__)
  _mm256_stream_si256(static_cast<__m256i*>(p), _mm256_loadu_si256(static_cast<const __m256i*>(src)));
  _mm256_stream_si256(static_cast<__m256i*>(p) + 1, _mm256_loadu_si256(static_cast<const __m256i*>(src) + 1));
#elif defined(__SSE2__)
  for (int i = 0; i < 4; ++i)
    _mm_stream_si128(static_cast<__m128i*>(p) + i, _mm_loadu_si128(static_cast<const __m128i*>(src) + i));
#else
  std::memcpy(p, src, 64);
#endif
}
static inline __attribute__((always_inline)) void stream32(void* p, const void* src) {
#if defined(__AVX__)
  _mm256_stream_si256(static_cast<__m256i*>(p), _mm256_loadu_si256(static_cast<const __m256i*>(src)));
#elif defined(__SSE2__)
  for (int i = 0; i < 2; ++i)
    _mm_stream_si128(static_cast<__m128i*>(p) + i, _mm_loadu_si128(static_cast<const __m128i*>(src) + i));
#else
  std::memcpy(p, src, 32);
#endif
}

#if defined(__AVX__) && !defined(__AVX512F__)
// Under AVX2, calls put(i, h) for the two register-wide halves h of v (lanes from i), taken by
// shuffles: stored whole through an address, GCC 12 spilled the 64-byte vector and rebuilt or
// copied each half on the stack, a store-forwarding round trip per vector (256x2048x7x7
// float32 inference ran 10% slower streamed than with regular stores; 1x256x14x14 inference
// 16.8 -> 15.1 us with regular stores by halves, AMD).
template <class A>
struct HalfReg;  // the register of half a vector (a specialization: std::conditional_t would
                 // drop the vector types' attributes, -Wignored-attributes)
template <>
struct HalfReg<float> {
  using type = __m256;
};
template <>
struct HalfReg<double> {
  using type = __m256d;
};
template <class A, class Put>
static inline __attribute__((always_inline)) void put_halves(const vec_t<A>& v, Put&& put) {
  typename HalfReg<A>::type h[2];
  split_regs(v, h, std::make_index_sequence<2>{});  // core/recipes.h
  put(0, h[0]);
  put(vlen<A> / 2, h[1]);
}
static inline __attribute__((always_inline)) void stream_half(float* p, __m256 h) { _mm256_stream_ps(p, h); }
static inline __attribute__((always_inline)) void stream_half(double* p, __m256d h) { _mm256_stream_pd(p, h); }
static inline __attribute__((always_inline)) void store_half(float* p, __m256 h) { _mm256_storeu_ps(p, h); }
static inline __attribute__((always_inline)) void store_half(double* p, __m256d h) { _mm256_storeu_pd(p, h); }
#endif

// A vector of the accumulation type streamed to p (64-byte aligned); by halves under AVX2.
template <class A>
static inline __attribute__((always_inline)) void stream_vector(A* p, vec_t<A> v) {
#if defined(__AVX__) && !defined(__AVX512F__)
  put_halves<A>(v, [p](int i, auto h) { stream_half(p + i, h); });
#else
  stream64(p, &v);
#endif
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// bfloat16 of two registers of float lanes, rounded to nearest even (add 0x7fff plus the kept
// part's lowest bit, keep the high half; a NaN stays a NaN, made quiet: the bits of every
// level), as the high half of each 32-bit lane of a and b (the low halves are left over).
// NaN lanes are found by one compare of the two registers (unordered where either lane is
// NaN) and, only then, made quiet by a blend per register: a compare and a blend per register
// on every vector had cost AMD EPYC Zen 3 12% of an in-cache bfloat16 inference (in-process,
// hot, 1 thread, 8x2048x7x7: NHWC 0.88x the time, NCHW 0.89x; training 0.95x, backward 0.92x;
// 32x64x56x56 NCHW from memory, 2 threads, 0.92x).
static inline __attribute__((always_inline)) void bf16_round_high(__m256 lo, __m256 hi, __m256i& a, __m256i& b) {
  auto round = [](__m256 f) {
    const __m256i w = _mm256_castps_si256(f);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(w, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(_mm256_add_epi32(w, _mm256_set1_epi32(0x7fff)), odd);
  };
  auto quiet_nans = [](__m256 f, __m256i r) {
    const __m256i w = _mm256_castps_si256(f);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_or_si256(w, _mm256_set1_epi32(0x400000)), nan);
  };
  a = round(lo);
  b = round(hi);
  if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(lo, hi, _CMP_UNORD_Q)) != 0, 0)) {
    a = quiet_nans(lo, a);
    b = quiet_nans(hi, b);
  }
}
// The bfloat16 words of lo and hi packed by one vpackusdw: lo's lanes 0-3, hi's 0-3, lo's 4-7,
// hi's 4-7 (the order of each 128-bit half).
static inline __attribute__((always_inline)) __m256i bf16_pack_avx2(__m256 lo, __m256 hi) {
  __m256i a, b;
  bf16_round_high(lo, hi, a, b);
  return _mm256_packus_epi32(_mm256_srli_epi32(a, 16), _mm256_srli_epi32(b, 16));
}
// The bfloat16 words of even and odd interleaved, even's lane l at word 2l and odd's at
// 2l + 1: odd's words stay in the high halves where the rounding leaves them, even's are
// shifted down and the two blended, one shift and one blend where the pack takes two shifts
// and a pack (the shift and shuffle units, of which Zen 3 has two, bound these maps).
static inline __attribute__((always_inline)) __m256i bf16_interleave_avx2(__m256 even, __m256 odd) {
  __m256i a, b;
  bf16_round_high(even, odd, a, b);
  return _mm256_blend_epi16(_mm256_srli_epi32(a, 16), b, 0xAA);
}
// The same of a vector of 16 float lanes (its two registers).
static inline __attribute__((always_inline)) __m256i bf16_pack_avx2(const vec_t<float>& v) {
  return bf16_pack_avx2((__m256)__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                        (__m256)__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}
#endif

// The 16-bit words of v's lanes in half type T (bfloat16 or float16), rounded to nearest even:
// storev's conversion, and store_partial's.
typedef uint16_t half_words __attribute__((vector_size(32)));
template <class T>
static inline __attribute__((always_inline)) half_words to_half_words(vec_t<acc_t<T>> v) {
  half_words h;
  if constexpr (std::is_same_v<T, bfloat16>) {
    // Round to nearest even (add 0x7fff plus the kept part's lowest bit, keep the high
    // half); a NaN stays a NaN, made quiet. Every ISA level computes these same bits.
#if defined(__AVX2__) && !defined(__AVX512F__)
    // Per 32-byte half, as in loadv, then both halves' high words packed at once and put in
    // order (bf16_pack_avx2, vpermq): GCC 12's generic per-half narrowing and join took twice
    // the instructions.
    const __m256i n = _mm256_permute4x64_epi64(bf16_pack_avx2(v), 0xD8);
    std::memcpy(&h, &n, sizeof(h));
#else
    typedef uint32_t u32 __attribute__((vector_size(64)));
    u32 u;
    std::memcpy(&u, &v, sizeof(u));
#if defined(__AVX512F__)
    // The same rounding in fewer operations: NaN lanes by a compare into a mask register,
    // their quiet NaN by one masked or, and the high halves gathered by one word permute
    // (a shift and vpmovdw were three uops on Intel; GCC 12's generic narrowing was a
    // two-register permute). L2-resident bfloat16 inference on the Xeon: 89 -> 73 us.
    const __m512i w = (__m512i)u;
#if defined(__AVX512BF16__)
    // The avx512_bf16 level: one vcvtneps2bf16, which rounds every lane as below (NaNs made
    // quiet by the same truncation) but flushes subnormal inputs to a signed zero; a vector
    // with a subnormal lane (found by vfpclassps) takes the rounding below instead. Checked
    // against it over all 2^32 float32 patterns on an AMD EPYC Zen 4: only subnormal inputs
    // differ. There, in-process, both orders, against the avx512 level's rounding, bfloat16, 1
    // thread: in cache inference 8x2048x7x7 0.84-0.90x the time, 32x64x28x28 NHWC 0.76x,
    // fused training 0.88-0.93x; from memory training 32x64x56x56 NCHW 0.85-0.88x; rows bound
    // by memory bandwidth level (256x2048x7x7 inference 0.97-1.03x). bench/NOTES.md: the session-36 bullet.
    if (__builtin_expect(_mm512_fpclass_ps_mask((__m512)w, 0x20) == 0, 1)) {
      const __m256i c = (__m256i)_mm512_cvtneps_pbh((__m512)w);
      std::memcpy(&h, &c, sizeof(h));
      return h;
    }
#endif
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(w, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(w, _mm512_set1_epi32(0x7fff)), odd);
    const __mmask16 nan = _mm512_cmp_ps_mask((__m512)w, (__m512)w, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, w, _mm512_set1_epi32(0x400000));
    const __m512i hi = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 31, 29, 27, 25, 23, 21, 19,
                                        17, 15, 13, 11, 9, 7, 5, 3, 1);
    const __m256i n = _mm512_castsi512_si256(_mm512_permutexvar_epi16(hi, r));
    std::memcpy(&h, &n, sizeof(h));
#else
    const u32 nan = (u32)((u & 0x7fffffffu) > 0x7f800000u);  // all ones where NaN
    const u32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const u32 quiet = (u >> 16) | 0x40u;
    h = __builtin_convertvector((rounded & ~nan) | (quiet & nan), half_words);
#endif
#endif
  } else {
    // Round to nearest even, as the scalar conversion does.
#if defined(__AVX512F__)
    __m512 f;
    std::memcpy(&f, &v, sizeof(f));
    const __m256i r = _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    std::memcpy(&h, &r, sizeof(h));
#elif defined(__F16C__) && defined(__AVX__)
    // Halves split and joined with shuffles (see loadv).
    typedef long long i2 __attribute__((vector_size(16)));
    const __m256 lo = (__m256)__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 hi = (__m256)__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const i2 rl = (i2)_mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const i2 rh = (i2)_mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    h = (half_words)__builtin_shufflevector(rl, rh, 0, 1, 2, 3);
#else
    typedef float16 f16 __attribute__((vector_size(32)));
    const f16 f = __builtin_convertvector(v, f16);
    std::memcpy(&h, &f, sizeof(h));
#endif
  }
  return h;
}

// Stores v to p in storage type T (round to nearest even); non-temporal when `stream` (p
// must then be 64-byte aligned for 4- and 8-byte types, 32-byte for 2-byte types).
template <class T, bool stream = false>
static inline __attribute__((always_inline)) void storev(T* p, vec_t<acc_t<T>> v) {
  using A = acc_t<T>;
  if constexpr (std::is_same_v<T, A>) {
    if constexpr (stream) {
      stream_vector<A>(p, v);
    } else {
#if defined(__AVX__) && !defined(__AVX512F__)
      put_halves<A>(v, [p](int i, auto h) { store_half(p + i, h); });
#else
      std::memcpy(p, &v, sizeof(v));
#endif
    }
  } else {
    const half_words h = to_half_words<T>(v);
    if constexpr (stream) stream32(p, &h);
    else std::memcpy(p, &h, sizeof(h));
  }
}

// Whether the maps store their vectors two at a time (storev2): bfloat16 at the avx512_bf16
// level, where one vcvtne2ps2bf16 rounds both vectors and one subnormal test (the branch
// to_half_words takes per vector) covers both; elsewhere storev2 is two storev. AMD EPYC Zen 4,
// L1-resident normalize loop, 1 thread: 0.091 -> 0.065 ns a value (a branch per vector and
// two vcvtneps2bf16: 0.076; no subnormal test at all: 0.067).
template <class T>
constexpr bool paired_stores() {
#if defined(__AVX512BF16__)
  return std::is_same_v<T, bfloat16>;
#else
  return false;
#endif
}

// storev of v0 to p and v1 to p + vlen (stream: non-temporal, p 32-byte aligned for half
// types). The same bits as two storev: vcvtne2ps2bf16 rounds each lane as vcvtneps2bf16 does,
// and a pair with a subnormal lane goes through storev, vector by vector.
template <class T, bool stream = false>
static inline __attribute__((always_inline)) void storev2(T* p, vec_t<acc_t<T>> v0, vec_t<acc_t<T>> v1) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, bfloat16>) {
    __m512 a, b;
    std::memcpy(&a, &v0, sizeof(a));
    std::memcpy(&b, &v1, sizeof(b));
    if (__builtin_expect((_mm512_fpclass_ps_mask(a, 0x20) | _mm512_fpclass_ps_mask(b, 0x20)) == 0, 1)) {
      const __m512i c = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // a's words low, b's high
      if constexpr (stream) {
        stream32(p, &c);
        stream32(p + vlen<float>, reinterpret_cast<const char*>(&c) + 32);
      } else {
        _mm512_storeu_si512(p, c);
      }
      return;
    }
  }
#endif
  storev<T, stream>(p, v0);
  storev<T, stream>(p + vlen<acc_t<T>>, v1);
}

// Whether maps whose coefficients vary by lane (map_run, map_flat, map_positions) compute a
// vector as its two registers of 8 float lanes, each from its own loads and the recipe applied
// per register, joined only by the store (the rounding's pack, or bf16_interleave_avx2), and
// the channels-last reductions (cl_moments, cl_grad_sums) accumulate in such registers:
// bfloat16 under AVX2. The 64-byte vector that loadv joins from halves
// (through a union: see loadv) was spilled there, two dead stores to the stack per vector, and
// joining it by a shuffle instead built it lane by lane in other kernels (statistics 3-4x the
// time, NHWC inference 5-7x). The registers hold values 0-7 and 8-15 (load_half_lanes,
// store_half_lanes), or the even and the odd values (load_even_odd, store_even_odd) where the
// coefficients are laid out so (map_run, EvenOddCoefficients). The same operations lane for
// lane: the same bits. AMD EPYC Zen 3, in-process, both orders, against loadv's vectors: in
// cache, 1 thread, 16x2048x7x7 NCHW inference 0.91-0.92x the time (values 0-7 and 8-15),
// training 0.90x; 32x512x6x6 inference 0.87-0.91x; the even and odd values on top of that
// (EvenOddCoefficients in map.h has the whole).
template <class T>
constexpr bool half_lane_maps() {
#if defined(__AVX2__) && !defined(__AVX512F__)
  return std::is_same_v<T, bfloat16>;
#else
  return false;
#endif
}
// Where value c of an array laid out in even-odd order (16 at a time from its start: the 8
// even values, then the 8 odd ones; even_odd_order) sits.
constexpr int64_t even_odd_at(int64_t c) { return c - c % 16 + (c % 2 ? 8 : 0) + c % 16 / 2; }
#if defined(__AVX2__) && !defined(__AVX512F__)
typedef float f32x8 __attribute__((vector_size(32)));
// 8 bfloat16 values from p as float lanes (exact: each word into its lane's high half).
static inline __attribute__((always_inline)) f32x8 load_half_lanes(const bfloat16* p) {
  return (f32x8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
}
// 8 float lanes from p (a coefficient array).
static inline __attribute__((always_inline)) f32x8 load_half_lanes(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
// The 16 values lo (0-7) and hi (8-15) to p as bfloat16, storev's rounding and order.
template <bool stream>
static inline __attribute__((always_inline)) void store_half_lanes(bfloat16* p, f32x8 lo, f32x8 hi) {
  const __m256i n = _mm256_permute4x64_epi64(bf16_pack_avx2((__m256)lo, (__m256)hi), 0xD8);
  if constexpr (stream) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), n);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), n);
}
// 16 bfloat16 values from p as the even ones (0, 2, ..., 14) and the odd ones, exactly: each
// 32-bit lane of the 32 bytes holds an even value's word in its low half and the next odd
// one's in its high half, so a shift up gives the even values and a mask the odd ones.
static inline __attribute__((always_inline)) void load_even_odd(const bfloat16* p, f32x8& even, f32x8& odd) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = (f32x8)_mm256_slli_epi32(h, 16);
  odd = (f32x8)_mm256_and_si256(h, _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
}
// 16 floats of src to dst in load_even_odd's order: the 8 even ones, then the 8 odd ones.
static inline __attribute__((always_inline)) void even_odd_order(const float* src, float* dst) {
  const __m256 a = _mm256_loadu_ps(src), b = _mm256_loadu_ps(src + 8);
  // Per 128-bit lane a0 a2 b0 b2 | a4 a6 b4 b6, then the 64-bit pairs put in order.
  const __m256 even = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
  const __m256 odd = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
  _mm256_storeu_ps(dst, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), _MM_SHUFFLE(3, 1, 2, 0))));
  _mm256_storeu_ps(dst + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(odd), _MM_SHUFFLE(3, 1, 2, 0))));
}
// n floats of src to dst, each 16 from the first in even_odd_order (the rest as they are).
static inline void even_odd_copy(const float* src, float* dst, int64_t n) {
  int64_t g = 0;
  for (; g + 16 <= n; g += 16) even_odd_order(src + g, dst + g);
  for (; g < n; ++g) dst[g] = src[g];
}
// The even and odd values back to p as bfloat16 (storev's rounding; bf16_interleave_avx2).
template <bool stream>
static inline __attribute__((always_inline)) void store_even_odd(bfloat16* p, f32x8 even, f32x8 odd) {
  const __m256i n = bf16_interleave_avx2((__m256)even, (__m256)odd);
  if constexpr (stream) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), n);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), n);
}
#endif

// loadv and storev for maps whose every lane takes the same coefficients (a channel's, splat):
// the lanes may hold the values in another order, which storev_unordered undoes, so each
// value's bits are storev's. bfloat16 under AVX2: the even values (0, 2, ..., 14) then the odd
// ones, each 32-bit lane of the 32 bytes loaded holding an even value's word in its low half
// and the next odd one's in its high half: a shift up and a mask give the two registers of
// float lanes, and the store's bf16_interleave_avx2 puts the words back. Per 16 values the
// load and the store (besides the rounding) take two shifts, a mask and a blend, where loadv
// and storev take two widenings, four shifts, a pack and a permute (the unpacks with zeros
// before took two shuffles, two shifts and a pack): these maps are bound by the shift and
// shuffle units, of which AMD Zen 3 has two. AMD EPYC
// Zen 3, in-process, both orders, against the unpacks through a union: 8x64x56x56 NCHW in
// cache, 1 thread, inference 0.94x the time, training 0.95-0.97x; from memory level (memory
// bound). Elsewhere loadv and storev: in particular where storev2 pairs vectors
// (paired_stores), which takes them in loadv's order.
template <class T>
static inline __attribute__((always_inline)) vec_t<acc_t<T>> loadv_unordered(const T* p) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  if constexpr (std::is_same_v<T, bfloat16>) {
    static_assert(!paired_stores<T>(), "storev2 takes vectors in loadv's order");
    // Joined by a shuffle, which GCC 12 keeps in registers here (a union spilled both halves
    // to the stack, dead stores, in every map that took it).
    f32x8 even, odd;
    load_even_odd(p, even, odd);
    return __builtin_shufflevector(even, odd, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
#endif
  return loadv(p);
}
template <class T, bool stream = false>
static inline __attribute__((always_inline)) void storev_unordered(T* p, vec_t<acc_t<T>> v) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  if constexpr (std::is_same_v<T, bfloat16>) {
    store_even_odd<stream>(p, __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
    return;
  }
#endif
  storev<T, stream>(p, v);
}

// n (<= vlen) values p[0], p[s], p[2s] ... in the low lanes, zeros above.
template <class T>
static inline __attribute__((always_inline)) vec_t<acc_t<T>> load_strided(const T* p, int64_t s, int64_t n) {
  using A = acc_t<T>;
  A tmp[vlen<A>] = {};
  for (int64_t j = 0; j < n; ++j) tmp[j] = load_at(p + j * s);
  vec_t<A> v;
  std::memcpy(&v, tmp, sizeof(v));
  return v;
}

// Lanes [0, n) (Below) or [n, vlen) all ones, the rest zero (0 <= n <= vlen): a window of
// vlen lanes over a table of vlen ones and vlen zeros (zeros then ones for !Below), one
// unaligned load. GCC 12 lowered the compare of a lane-index vector on AVX2 (64-byte
// vectors, 32-byte registers) lane by lane, a cmov and a store per lane, on every short row's
// tail: 3/4 of the time of 7x7-plane statistics.
template <class A, bool Below>
struct LaneMaskTable {
  using A_bits = std::conditional_t<sizeof(A) == 4, int32_t, int64_t>;
  A_bits v[2 * vlen<A>];
  constexpr LaneMaskTable() : v() {
    for (int j = 0; j < 2 * vlen<A>; ++j) v[j] = (j < vlen<A>) == Below ? A_bits(-1) : A_bits(0);
  }
};
// The window's first lane for n: vlen lanes from there are the mask.
template <class A, bool Below>
static inline __attribute__((always_inline)) const auto* lanes_mask_window(int64_t n) {
  static constexpr LaneMaskTable<A, Below> table{};
  return table.v + vlen<A> - n;
}
template <class A, bool Below>
static inline __attribute__((always_inline)) vec_t<A> lanes_mask(int64_t n) {
  vec_t<A> r;
  std::memcpy(&r, lanes_mask_window<A, Below>(n), sizeof(r));
  return r;
}
// Masks the unused lanes of a partial vector.
template <class A>
static inline __attribute__((always_inline)) vec_t<A> lanes_below(int64_t n) { return lanes_mask<A, true>(n); }
// Masks the lanes a row's tail vector shares with the vector before it.
template <class A>
static inline __attribute__((always_inline)) vec_t<A> lanes_from(int64_t n) { return lanes_mask<A, false>(n); }

// The first n (< vlen) values of p in the low lanes, zeros above. Under AVX2, float and double
// by two masked loads (lanes past n are not read, so they cannot fault): element by element
// into a zeroed array, the vector read back from it waited for the stores to reach the cache
// (they cannot be forwarded to a wider load), at every row's tail: the hottest instructions of
// 1x256x14x14 float32 statistics (196-value planes, a 4-value tail each), which took 59 -> 50
// us a call (median of 6 alternating runs, one AMD EPYC thread). Under AVX-512 by one
// zero-masking load (which does not fault on the masked lanes either), widened as loadv does
// for half types: the element-by-element path stalled the same way, worst where the tails of
// a tile's rows follow one another (the side-by-side walks, kernels/walk.h), which made 16x128x14x14
// float32 statistics 1.14x the time on their own. AMD EPYC Zen 4, 1 thread, in cache, both
// changes against neither, in-process, both orders: statistics 16x128x14x14 float32 0.85x,
// bfloat16 0.72x, 32x64x28x28 0.97x; backward 16x128x14x14 float32 0.78x, bfloat16 0.72x,
// 8x64x10x10 0.64x. The same lanes either way.
template <class T>
static inline __attribute__((always_inline)) vec_t<acc_t<T>> load_partial(const T* p, int64_t n) {
  using A = acc_t<T>;
#if defined(__AVX512F__)
  vec_t<A> v;
  if constexpr (std::is_same_v<T, float>) {
    const __m512 f = _mm512_maskz_loadu_ps(lanes_below_mask(n), p);
    std::memcpy(&v, &f, sizeof(v));
  } else if constexpr (std::is_same_v<T, double>) {
    const __m512d d = _mm512_maskz_loadu_pd(static_cast<__mmask8>(lanes_below_mask(n)), p);
    std::memcpy(&v, &d, sizeof(v));
  } else {
    v = widen_half_words<T>(_mm256_maskz_loadu_epi16(lanes_below_mask(n), p));
  }
  return v;
#else
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, A>) {
    constexpr int H = vlen<A> / 2;  // lanes of one 32-byte half
    const auto* mask = lanes_mask_window<A, true>(n);  // lanes_below's, by halves
    __m256i lo, hi;
    std::memcpy(&lo, mask, sizeof(lo));
    std::memcpy(&hi, mask + H, sizeof(hi));
    typedef A half __attribute__((vector_size(32)));
    half a, b;
    if constexpr (sizeof(A) == 4) {
      a = (half)_mm256_maskload_ps(p, lo);
      b = (half)_mm256_maskload_ps(p + H, hi);
    } else {
      a = (half)_mm256_maskload_pd(p, lo);
      b = (half)_mm256_maskload_pd(p + H, hi);
    }
    // Joined by copies, which the memcpy split of Acc takes apart for free (joined by a
    // shuffle, 1x256x14x14 backward went from 85-95 to 105-110 us instead).
    vec_t<A> v;
    std::memcpy(&v, &a, sizeof(a));
    std::memcpy(reinterpret_cast<char*>(&v) + sizeof(a), &b, sizeof(b));
    return v;
  }
#endif
  A tmp[vlen<A>] = {};
  for (int64_t j = 0; j < n; ++j) tmp[j] = load_at(p + j);
  vec_t<A> v;
  std::memcpy(&v, tmp, sizeof(v));
  return v;
#endif
}

// Whether load_partial is masked loads rather than values copied one by one into an array
// (whose vector, read back, waits for the stores): under AVX-512 for every type, under AVX2 for
// float and double. The channels-last reductions take the channels past the last whole vector
// as one partial vector per position where it is (kernels/moments.h, kernels/gradient.h).
template <class T>
constexpr bool masked_loads() {
#if defined(__AVX512F__)
  return true;
#elif defined(__AVX2__)
  return std::is_same_v<T, acc_t<T>>;
#else
  return false;
#endif
}

// The first n lanes of v to p (an array of the accumulation type; n <= vlen).
template <class A>
static inline __attribute__((always_inline)) void store_lanes(A* p, const vec_t<A>& v, int64_t n) {
  std::memcpy(p, &v, static_cast<size_t>(n) * sizeof(A));
}

template <class A>
static inline __attribute__((always_inline)) vec_t<A> mask_lanes(vec_t<A> v, vec_t<A> mask) {
  using A_bits = std::conditional_t<sizeof(A) == 4, int32_t, int64_t>;
  typedef A_bits ivec __attribute__((vector_size(64)));
  ivec a, m;
  std::memcpy(&a, &v, sizeof(a));
  std::memcpy(&m, &mask, sizeof(m));
  a &= m;
  std::memcpy(&v, &a, sizeof(v));
  return v;
}

// Whether the channels-first maps (map_contiguous) take a row tail shorter than half a vector
// as one partial vector rather than value by value: under AVX-512, whose partial loads and
// stores are masked, but for bfloat16, whose computed vector rounding (to_half_words) cost more
// than four values' scalar one; at the avx512_bf16 level, whose rounding is one instruction,
// bfloat16 too. AMD EPYC Zen 4, in cache, 1 thread, in-process, both orders, against value by
// value: inference 8x64x10x10 0.85-0.87x the time, 16x128x14x14 0.91x, training 16x128x14x14
// 0.95x, backward 0.95-0.98x; 32x64x28x28 (no tail) level. The same bits.
template <class T>
constexpr bool masked_partials() {
#if defined(__AVX512BF16__)
  return true;
#elif defined(__AVX512F__)
  return !std::is_same_v<T, bfloat16>;
#else
  return false;
#endif
}

// Stores the low n (< vlen) lanes of v to p: under AVX-512 by one masked store (lanes past n
// are not written, so they cannot fault; half types converted as storev converts), else
// value by value.
template <class T>
static inline __attribute__((always_inline)) void store_partial(T* p, vec_t<acc_t<T>> v, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    __m512 f;
    std::memcpy(&f, &v, sizeof(f));
    _mm512_mask_storeu_ps(p, lanes_below_mask(n), f);
  } else if constexpr (std::is_same_v<T, double>) {
    __m512d d;
    std::memcpy(&d, &v, sizeof(d));
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>(lanes_below_mask(n)), d);
  } else {
    const half_words h = to_half_words<T>(v);
    __m256i w;
    std::memcpy(&w, &h, sizeof(w));
    _mm256_mask_storeu_epi16(p, lanes_below_mask(n), w);
  }
#else
  using A = acc_t<T>;
  A tmp[vlen<A>];
  std::memcpy(tmp, &v, sizeof(v));
  for (int64_t j = 0; j < n; ++j) store_at(p + j, tmp[j]);
#endif
}

static inline void store_fence() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_sfence();
#endif
}

}  // namespace batchnorm::cpu::BN_ISA
