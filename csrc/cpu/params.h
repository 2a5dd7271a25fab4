// Per-channel parameter vectors (weight, bias, statistics) of any dtype and stride read
// into the accumulation type, and running statistics written back in their own dtype.
#pragma once
#include <vector>

#include "core/tensor.h"
#include "cpu/convert.h"

namespace batchnorm::cpu {

// The values of a (C,) view as A, or `fill` repeated when the view is undefined.
// The dtype is dispatched once per vector, not per value: with 18432 channels, per-value
// dispatch was most of a 62 us per-channel prologue (inference of (1, 18432), Xeon). The
// values are those of load_any / store_any.
template <class A>
std::vector<A> load_vector(const TensorView& t, int64_t n, A fill) {
  if (!t.defined()) return std::vector<A>(static_cast<size_t>(n), fill);
  std::vector<A> v(static_cast<size_t>(n));
  const int64_t s = t.strides[0];
  dispatch_dtype(t.dtype, "vector", [&](auto d) {
    using S = storage_t<decltype(d)::value>;
    const S* p = static_cast<const S*>(t.data);
    for (int64_t i = 0; i < n; ++i) v[i] = static_cast<A>(static_cast<double>(load_at(p + i * s)));
  });
  return v;
}

template <class A>
void store_vector(const TensorView& t, const A* values) {
  const int64_t s = t.strides[0];
  dispatch_dtype(t.dtype, "vector", [&](auto d) {
    using S = storage_t<decltype(d)::value>;
    S* p = static_cast<S*>(t.data);
    for (int64_t i = 0; i < t.shape[0]; ++i) {
      const double v = static_cast<double>(values[i]);
      if constexpr (std::is_same_v<S, double>)
        store_at(p + i * s, v);
      else
        store_at(p + i * s, static_cast<float>(v));
    }
  });
}

}  // namespace batchnorm::cpu
