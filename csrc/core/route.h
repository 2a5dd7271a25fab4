// Routing a validated op to the backend of its arrays' device (the Backend table), and the views the op layer
// composes ops from (slices along axis 0, rows of a (rows, C) array). Internal to csrc/core.
#pragma once
#include <cstdint>

#include "core/backend.h"

namespace batchnorm::detail {

inline bool on_cuda(const TensorView& x) { return x.device.kind == DeviceKind::cuda; }

// Runs one op of the backend of x's device, whose arguments have all been checked:
// route(&Backend::forward_training, p, p.x, layout).
template <class P>
void route(void (*Backend::*op)(const P&, const Layout&), const P& p, const TensorView& x, const Layout& layout) {
  (backend_for(x.device).*op)(p, layout);
}

// Samples [begin, begin + n) of t along axis 0 (undefined stays undefined).
inline TensorView slice0(const TensorView& t, int64_t begin, int64_t n) {
  if (!t.defined()) return t;
  TensorView v = t;
  v.shape[0] = n;
  v.data = static_cast<char*>(t.data) +
           begin * t.strides[0] * static_cast<int64_t>(dtype_size(t.dtype));
  return v;
}

// Row r of a 2-D (rows, C) array, as a (C,) view.
inline TensorView row_of(const TensorView& t, int64_t r) {
  TensorView v = t;
  v.ndim = 1;
  v.shape[0] = t.shape[1];
  v.strides[0] = t.strides[1];
  v.shape[1] = v.strides[1] = 0;
  v.data = static_cast<char*>(t.data) + r * t.strides[0] * static_cast<int64_t>(dtype_size(t.dtype));
  return v;
}

}  // namespace batchnorm::detail
