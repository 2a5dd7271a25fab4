// Element types: the four dtypes of the contract, their accumulation type, and
// dispatch_dtype, the single place where a runtime dtype becomes a compile-time one.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>
#include <utility>

#include "core/errors.h"

namespace batchnorm {

enum class DType : int { float16 = 0, bfloat16 = 1, float32 = 2, float64 = 3 };

// The one table of the four dtypes: the name NumPy, JAX and torch give each, its item size,
// and its DLPack type (code, bits; lanes 1). Every binding maps its library's dtypes through
// it (core/dlpack.cpp, bindings/dlpack.cpp, jax/handlers.cpp). The DLPack codes are
// DLDataTypeCode's kDLFloat (2) and kDLBfloat (4), checked against the header in dlpack.cpp
// (kernels include this file without the public header).
// `overflow` is the magnitude from which a value rounds to Inf in the dtype (round to nearest:
// the largest finite value plus half its spacing), infinite for float64.
struct DTypeInfo {
  DType dtype;
  const char* name;
  std::size_t size;
  std::uint8_t dlpack_code;
  std::uint8_t dlpack_bits;
  double overflow;
};
inline constexpr DTypeInfo kDTypes[] = {
    {DType::float16, "float16", 2, 2, 16, 0x1.ffep15},      // 65504 + 16
    {DType::bfloat16, "bfloat16", 2, 4, 16, 0x1.ffp127},    // (2 - 2^-7) 2^127 + 2^119
    {DType::float32, "float32", 4, 2, 32, 0x1.ffffffp127},  // FLT_MAX + 2^103
    {DType::float64, "float64", 8, 2, 64, __builtin_huge_val()},
};
inline constexpr int kNumDTypes = static_cast<int>(sizeof(kDTypes) / sizeof(kDTypes[0]));
// A DType's code is its row: the lookups below index the table with it.
static_assert([] {
  for (int i = 0; i < kNumDTypes; ++i)
    if (static_cast<int>(kDTypes[i].dtype) != i) return false;
  return true;
}());

constexpr bool is_dtype_code(int code) { return code >= 0 && code < kNumDTypes; }
constexpr const DTypeInfo& dtype_info(DType t) { return kDTypes[static_cast<int>(t)]; }

inline const char* dtype_name(DType t) { return is_dtype_code(static_cast<int>(t)) ? dtype_info(t).name : "unknown"; }

// See DTypeInfo::overflow (infinite for a code outside the table).
inline double dtype_overflow(DType t) {
  return is_dtype_code(static_cast<int>(t)) ? dtype_info(t).overflow : __builtin_huge_val();
}

// 0 for a code outside the table (callers check the dtype before they use its size).
inline std::size_t dtype_size(DType t) { return is_dtype_code(static_cast<int>(t)) ? dtype_info(t).size : 0; }

// The row named `name` ("float32", "bfloat16"...), or null.
inline const DTypeInfo* find_dtype(std::string_view name) {
  for (const DTypeInfo& d : kDTypes)
    if (name == d.name) return &d;
  return nullptr;
}

// The row of a DLPack (code, bits) with lanes 1, or null.
constexpr const DTypeInfo* find_dtype(std::uint8_t dlpack_code, std::uint8_t dlpack_bits) {
  for (const DTypeInfo& d : kDTypes)
    if (d.dlpack_code == dlpack_code && d.dlpack_bits == dlpack_bits) return &d;
  return nullptr;
}

// float32 accumulation for half and single precision, float64 for double: never half.
inline DType accumulation_dtype(DType t) { return t == DType::float64 ? DType::float64 : DType::float32; }

// The four names as every message lists them.
inline constexpr const char* kDTypeList = "float16, bfloat16, float32 or float64";

// The words of every binding for an array of a dtype outside the four (`got` as the array
// library names it, e.g. "int32").
[[noreturn]] inline void unsupported_dtype(const char* arg, std::string_view got) {
  throw type_error(detail::concat(arg, " must have dtype ", kDTypeList, ", got ", got));
}

// The dtype named as NumPy and JAX name it ("float32", "bfloat16"...), else unsupported_dtype.
inline DType dtype_from_name(const char* name, const char* arg) {
  if (const DTypeInfo* d = find_dtype(std::string_view(name))) return d->dtype;
  unsupported_dtype(arg, name);
}

template <DType D>
using dtype_constant = std::integral_constant<DType, D>;

// Calls f(dtype_constant<D>{}) for the runtime dtype; an unknown dtype is a TypeError naming
// the argument. Backends map the constant to their own storage type (cpu/convert.h,
// cuda/convert.cuh), so this switch is written once for every backend.
template <class F>
decltype(auto) dispatch_dtype(DType t, const char* arg, F&& f) {
  switch (t) {
    case DType::float16: return f(dtype_constant<DType::float16>{});
    case DType::bfloat16: return f(dtype_constant<DType::bfloat16>{});
    case DType::float32: return f(dtype_constant<DType::float32>{});
    case DType::float64: return f(dtype_constant<DType::float64>{});
  }
  unsupported_dtype(arg, detail::concat("dtype code ", static_cast<int>(t)));
}

}  // namespace batchnorm
