// Routing a validated op to the backend of its arrays' device, and the views the op layer
// composes ops from (slices along axis 0, rows of a (rows, C) array). Internal to csrc/core.
#pragma once
#include <cstdint>

#include "core/backend.h"

namespace batchnorm::detail {

inline bool on_cuda(const TensorView& x) { return x.device.kind == DeviceKind::cuda; }

#if defined(BN_WITH_CUDA)
#define BN_CUDA_FN(f) cuda::f
#else
#define BN_CUDA_FN(f) nullptr
#endif

// Runs the CPU or CUDA function of an op whose arguments have all been checked (nothing when
// only validating). A missing CUDA function means a build without CUDA, which the checks
// have already refused for CUDA arrays.
template <class P>
void route_op(const TensorView& x, void (*cpu_fn)(const P&, const Layout&), void (*cuda_fn)(const P&, const Layout&),
              const P& p, const Layout& layout) {
  if (p.exec.validate_only) return;
  if (on_cuda(x)) {
    if (cuda_fn) cuda_fn(p, layout);
  } else {
    cpu_fn(p, layout);
  }
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
