// Per-channel parameter vectors (weight, bias, statistics) of any dtype and stride read
// into the accumulation type, and running statistics written back in their own dtype.
#pragma once
#include <vector>

#include "core/tensor.h"
#include "cpu/convert.h"

namespace batchnorm::cpu {

// The values of a (C,) view as A, or `fill` repeated when the view is undefined.
template <class A>
std::vector<A> load_vector(const TensorView& t, int64_t n, A fill) {
  std::vector<A> v(static_cast<size_t>(n), fill);
  if (!t.defined()) return v;
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<A>(load_any(t.data, t.dtype, i * t.strides[0]));
  return v;
}

template <class A>
void store_vector(const TensorView& t, const A* values) {
  for (int64_t i = 0; i < t.shape[0]; ++i) store_any(t.data, t.dtype, i * t.strides[0], static_cast<double>(values[i]));
}

}  // namespace batchnorm::cpu
