// CPU storage types of the four dtypes and their exact conversions to and from the
// accumulation type: float16 is the compiler's IEEE binary16 type (F16C instructions where the
// ISA level has them), bfloat16 a bit pattern converted with round-to-nearest-even.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/dtype.h"

// The per-ISA kernel units predefine BN_CPU_INLINE as `static inline` (see core/recipes.h).
#ifndef BN_CPU_INLINE
#define BN_CPU_INLINE inline
#endif

namespace batchnorm::cpu {

struct bfloat16 {
  uint16_t bits;
};
// IEEE binary16 as the compiler names it: _Float16, but AArch64's __fp16 where GCC's C++ has
// no _Float16 (GCC 12 there: "'_Float16' does not name a type"; C++ has it from GCC 13). The
// same format and the same round-to-nearest-even conversions; __fp16's arithmetic is done in
// float, which the kernels convert to first anyway.
#if defined(__aarch64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
using float16 = __fp16;
#else
using float16 = _Float16;
#endif

template <DType D> struct storage;
template <> struct storage<DType::float16> { using type = float16; };
template <> struct storage<DType::bfloat16> { using type = bfloat16; };
template <> struct storage<DType::float32> { using type = float; };
template <> struct storage<DType::float64> { using type = double; };
template <DType D> using storage_t = typename storage<D>::type;

template <class T> struct accumulate { using type = float; };
template <> struct accumulate<double> { using type = double; };
template <class T> using acc_t = typename accumulate<T>::type;

BN_CPU_INLINE float load(float v) { return v; }
BN_CPU_INLINE double load(double v) { return v; }
BN_CPU_INLINE float load(float16 v) { return static_cast<float>(v); }
BN_CPU_INLINE float load(bfloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A double on its way to float16 or bfloat16, as a float that rounds to the same half value
// as the double: rounded to odd (truncated, its last bit set when inexact), which a second
// rounding to nearest cannot spoil while the float has 2 bits more than the half type. Rounded
// to nearest twice, a double a hair above a half-type tie landed on the tie, then went to even:
// 1 ulp off in about 1 value in 8000 (running statistics, fold, parameters in double).
BN_CPU_INLINE float to_float_for_half(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) == v || !(f - f == 0.0f)) return f;  // exact, NaN, or past float's range
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::fabs(static_cast<double>(f)) > std::fabs(v)) --bits;  // rounded away from zero: truncate
  bits |= 1u;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Rounds an accumulator value to storage type T (round to nearest even, once).
template <class T, class V>
BN_CPU_INLINE T store(V v) {
  if constexpr (std::is_same_v<V, double> && (std::is_same_v<T, bfloat16> || std::is_same_v<T, float16>)) {
    return store<T>(to_float_for_half(v));
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    const float f = static_cast<float>(v);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    // NaNs stay NaN (quiet bit forced, so rounding cannot turn one into an Inf).
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return bfloat16{static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded)};
  } else {
    return static_cast<T>(v);
  }
}

// One element at p, which may sit off its type's alignment (NumPy arrays can be one byte
// off): read and written through memcpy, which compiles to a plain move, so no access is
// ever made through a misaligned T* (undefined behaviour, even where x86 tolerates it).
template <class T>
BN_CPU_INLINE auto load_at(const T* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return load(v);
}
template <class T, class V>
BN_CPU_INLINE void store_at(T* p, V v) {
  const T s = store<T>(v);
  std::memcpy(p, &s, sizeof(T));
}

// Values of any dtype read into double / written from double (parameters, running stats).
BN_CPU_INLINE double load_any(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::float16: return load_at(static_cast<const float16*>(p) + i);
    case DType::bfloat16: return load_at(static_cast<const bfloat16*>(p) + i);
    case DType::float32: return load_at(static_cast<const float*>(p) + i);
    case DType::float64: return load_at(static_cast<const double*>(p) + i);
  }
  return 0.0;
}
BN_CPU_INLINE void store_any(void* p, DType t, int64_t i, double v) {
  switch (t) {
    case DType::float16: store_at(static_cast<float16*>(p) + i, v); break;
    case DType::bfloat16: store_at(static_cast<bfloat16*>(p) + i, v); break;
    case DType::float32: store_at(static_cast<float*>(p) + i, v); break;
    case DType::float64: store_at(static_cast<double*>(p) + i, v); break;
  }
}

// Whether a[0, n) (any dtype) is all finite: v * 0 is 0 for a finite v and NaN for an Inf or
// a NaN, added up in 8 independent lanes, which GCC vectorizes at every ISA level (SSE2
// included, where a test of the exponent bits of doubles, or a loop of std::isfinite, stayed
// scalar). The overflow checks of per-channel results (the backward's sums and coefficients)
// and the rescues' scans of a channel's rows (cpu/plan.h, channel_finite) run it.
template <class T>
BN_CPU_INLINE bool all_finite(const T* a, int64_t n) {
  using A = acc_t<T>;
  A lanes[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lanes[j] += load(a[i + j]) * A(0);
  for (; i < n; ++i) lanes[0] += load(a[i]) * A(0);
  A total = 0;
  for (int j = 0; j < 8; ++j) total += lanes[j];
  return total == A(0);
}

}  // namespace batchnorm::cpu
