// Builds the merged (outer, channels, inner) walk of same-shaped arrays: see layout.h.
#include "core/layout.h"

#include <algorithm>
#include <cstdlib>

namespace batchnorm {

std::string device_name(const Device& d) {
  return d.kind == DeviceKind::cpu ? std::string("cpu") : detail::concat("cuda:", d.index);
}

std::string shape_string(const TensorView& t) {
  std::ostringstream s;
  s << '(';
  for (int i = 0; i < t.ndim; ++i) s << (i ? ", " : "") << t.shape[i];
  s << (t.ndim == 1 ? ",)" : ")");
  return s.str();
}

int normalize_axis(int axis, int ndim, const char* arg) {
  BN_EXPECTS(axis >= -ndim && axis < ndim, value_error, arg, " must be in [", -ndim, ", ", ndim - 1,
             "] for an array of rank ", ndim, ", got ", axis);
  return axis < 0 ? axis + ndim : axis;
}

Layout make_layout(int axis, const TensorView* const* arrays, int n) {
  const TensorView& x = *arrays[0];
  Layout L;
  L.ntensors = n;
  L.channels = x.shape[axis];
  L.count = 1;
  int dims[kMaxDims];
  int nd = 0;
  for (int d = 0; d < x.ndim; ++d) {
    if (d == axis) continue;
    L.count *= x.shape[d];
    if (x.shape[d] != 1) dims[nd++] = d;  // size-1 dims never move the walk
  }
  for (int t = 0; t < n; ++t) L.channel_stride[t] = arrays[t]->strides[axis];
  // Outer to inner by the first array's |stride|; stable so equal strides keep their order.
  std::stable_sort(dims, dims + nd, [&](int a, int b) {
    return std::llabs(x.strides[a]) > std::llabs(x.strides[b]);
  });
  int nred = 0;
  for (int i = 0; i < nd; ++i) {
    const int d = dims[i];
    bool mergeable = nred > 0;
    for (int t = 0; t < n && mergeable; ++t)
      mergeable = L.strides[t][nred - 1] == arrays[t]->strides[d] * x.shape[d];
    if (mergeable) {
      L.sizes[nred - 1] *= x.shape[d];
      for (int t = 0; t < n; ++t) L.strides[t][nred - 1] = arrays[t]->strides[d];
    } else {
      L.sizes[nred] = x.shape[d];
      for (int t = 0; t < n; ++t) L.strides[t][nred] = arrays[t]->strides[d];
      ++nred;
    }
  }
  if (nred == 0) {
    L.sizes[0] = 1;
    for (int t = 0; t < n; ++t) L.strides[t][0] = 0;
    nred = 1;
  }
  if (L.count == 0) L.sizes[nred - 1] = 0;
  L.nred = nred;
  return L;
}

}  // namespace batchnorm
