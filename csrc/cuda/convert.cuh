// CUDA storage types of the four dtypes (the device counterpart of cpu/convert.h), their
// conversions to and from the accumulation type, 16-byte packs for vector loads, and
// ParamRef: a per-channel vector of any dtype and stride read on the device.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "core/dtype.h"
#include "core/tensor.h"

namespace batchnorm::cuda {

template <DType D> struct storage;
template <> struct storage<DType::float16> { using type = __half; };
template <> struct storage<DType::bfloat16> { using type = __nv_bfloat16; };
template <> struct storage<DType::float32> { using type = float; };
template <> struct storage<DType::float64> { using type = double; };
// dispatch_dtype(t, arg, [&](auto d) { using T = storage_t<decltype(d)::value>; ... })
template <DType D> using storage_t = typename storage<D>::type;

// float accumulation for the half types and float, double for double: never half.
template <class T> struct accumulate { using type = float; };
template <> struct accumulate<double> { using type = double; };
template <class T> using acc_t = typename accumulate<T>::type;

__device__ __forceinline__ float load(__half v) { return __half2float(v); }
__device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float load(float v) { return v; }
__device__ __forceinline__ double load(double v) { return v; }

// Rounds an accumulator value to storage type T (round to nearest even, NaN stays NaN).
template <class T>
__device__ __forceinline__ T store(acc_t<T> v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

// V consecutive values moved as one access (16 bytes when V = 16 / sizeof(T)). Callers only
// form a Pack pointer where the address is aligned to sizeof(Pack).
template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// The widest pack of T: 16 bytes.
template <class T>
constexpr int kVecWidth = static_cast<int>(16 / sizeof(T));

// A (C,) vector of any dtype and stride as the kernels see it; data == nullptr means "not
// given" and reads as the caller's fill value.
struct ParamRef {
  void* data = nullptr;
  int64_t stride = 0;
  DType dtype = DType::float32;
};

inline ParamRef param_ref(const TensorView& t) {
  ParamRef r;
  if (t.defined()) {
    r.data = t.data;
    r.stride = t.ndim >= 1 ? t.strides[0] : 0;
    r.dtype = t.dtype;
  }
  return r;
}

// Element i of an array of runtime dtype `t` as double (exact for every dtype), and v written
// back rounded once to nearest, as the CPU does it (cpu/convert.h: through a float rounded to
// odd; here the conversion from double itself). These two switches are the
// device twins of cpu::load_any / store_any: host code picks storage types with
// dispatch_dtype, but a parameter vector's dtype is only known per vector, in the kernel.
__device__ __forceinline__ double load_any(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::float16: return static_cast<double>(load(static_cast<const __half*>(p)[i]));
    case DType::bfloat16: return static_cast<double>(load(static_cast<const __nv_bfloat16*>(p)[i]));
    case DType::float32: return static_cast<double>(static_cast<const float*>(p)[i]);
    case DType::float64: return static_cast<const double*>(p)[i];
  }
  return 0.0;
}

__device__ __forceinline__ void store_any(void* p, DType t, int64_t i, double v) {
  switch (t) {
    case DType::float16: static_cast<__half*>(p)[i] = __double2half(v); break;
    case DType::bfloat16: static_cast<__nv_bfloat16*>(p)[i] = __double2bfloat16(v); break;
    case DType::float32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case DType::float64: static_cast<double*>(p)[i] = v; break;
  }
}

// Element c of a parameter vector, or `fill` when it was not given.
__device__ __forceinline__ double load_param(const ParamRef& r, int64_t c, double fill) {
  return r.data == nullptr ? fill : load_any(r.data, r.dtype, c * r.stride);
}

// Writes element c of a (given) parameter vector in its own dtype.
__device__ __forceinline__ void store_param(const ParamRef& r, int64_t c, double v) {
  store_any(r.data, r.dtype, c * r.stride, v);
}

}  // namespace batchnorm::cuda
