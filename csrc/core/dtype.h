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

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::float16: return "float16";
    case DType::bfloat16: return "bfloat16";
    case DType::float32: return "float32";
    case DType::float64: return "float64";
  }
  return "unknown";
}

inline std::size_t dtype_size(DType t) { return t == DType::float64 ? 8 : t == DType::float32 ? 4 : 2; }

// float32 accumulation for half and single precision, float64 for double: never half.
inline DType accumulation_dtype(DType t) { return t == DType::float64 ? DType::float64 : DType::float32; }

// The words of every binding for an array of a dtype outside the four (`got` as the array
// library names it, e.g. "int32").
[[noreturn]] inline void unsupported_dtype(const char* arg, const char* got) {
  throw type_error(detail::concat(arg, " must have dtype float16, bfloat16, float32 or float64, got ", got));
}

// The dtype named as NumPy and JAX name it ("float32", "bfloat16"...), else unsupported_dtype.
inline DType dtype_from_name(const char* name, const char* arg) {
  for (DType t : {DType::float16, DType::bfloat16, DType::float32, DType::float64})
    if (std::string_view(name) == dtype_name(t)) return t;
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
  throw type_error(detail::concat(arg, " must have dtype float16, bfloat16, float32 or float64, got dtype code ",
                                  static_cast<int>(t)));
}

}  // namespace batchnorm
