// Argument checks shared by every op (see validate.h).
#include "core/validate.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <utility>

#include "core/errors.h"

namespace batchnorm::detail {

void check_float_array(const TensorView& t, const char* arg) {
  const int code = static_cast<int>(t.dtype);
  BN_EXPECTS(code >= 0 && code <= 3, type_error, arg,
             " must have dtype float16, bfloat16, float32 or float64, got dtype code ", code);
  BN_EXPECTS(t.ndim >= 0 && t.ndim <= kMaxDims, value_error, arg, " must have at most ", kMaxDims,
             " dimensions, got ", t.ndim);
}

void check_same_device(const TensorView& a, const char* a_arg, const TensorView& b, const char* b_arg) {
  BN_EXPECTS(a.device == b.device, type_error, b_arg, " must be on the same device as ", a_arg, " (",
             device_name(a.device), "), got ", device_name(b.device));
}

void check_channel_vector(const TensorView& t, const char* arg, int64_t channels, const Device& device,
                          const char* device_arg) {
  check_float_array(t, arg);
  BN_EXPECTS(t.device == device, type_error, arg, " must be on the same device as ", device_arg, " (",
             device_name(device), "), got ", device_name(t.device));
  BN_EXPECTS(t.ndim == 1 && t.shape[0] == channels, value_error, arg, " must have shape (", channels,
             ",), got ", shape_string(t));
}

void check_writable(const TensorView& t, const char* arg) {
  BN_EXPECTS(!t.read_only, value_error, arg, " must be writable, got a read-only array");
}

void check_same_shape(const TensorView& a, const char* a_arg, const TensorView& b, const char* b_arg) {
  bool same = a.ndim == b.ndim;
  for (int i = 0; same && i < a.ndim; ++i) same = a.shape[i] == b.shape[i];
  BN_EXPECTS(same, value_error, b_arg, " must have the shape of ", a_arg, ", ", shape_string(a), ", got ",
             shape_string(b));
}

namespace {
// Byte range [lo, hi) that a view touches.
void byte_span(const TensorView& t, intptr_t& lo, intptr_t& hi) {
  const intptr_t base = reinterpret_cast<intptr_t>(t.data);
  const intptr_t es = static_cast<intptr_t>(dtype_size(t.dtype));
  intptr_t a = 0, b = 0;
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] == 0) {
      lo = hi = base;
      return;
    }
    const intptr_t ext = static_cast<intptr_t>((t.shape[i] - 1) * t.strides[i]) * es;
    if (ext < 0) a += ext; else b += ext;
  }
  lo = base + a;
  hi = base + b + es;
}

bool same_strides(const TensorView& a, const TensorView& b) {
  if (a.ndim != b.ndim || a.dtype != b.dtype) return false;
  for (int i = 0; i < a.ndim; ++i)
    if (a.shape[i] > 1 && a.strides[i] != b.strides[i]) return false;
  return true;
}

// Some element of `out` is written at two logical positions (a zero or overlapping stride).
bool self_overlapping(const TensorView& t) {
  // Sort-free check good for the layouts arrays have: every non-trivial stride must be
  // non-zero and the dims, ordered by |stride|, must each step past the previous extent.
  int64_t order[kMaxDims];
  int n = 0;
  for (int i = 0; i < t.ndim; ++i)
    if (t.shape[i] > 1) order[n++] = i;
  for (int i = 1; i < n; ++i)  // insertion sort by |stride|
    for (int j = i; j > 0 && std::llabs(t.strides[order[j]]) < std::llabs(t.strides[order[j - 1]]); --j)
      std::swap(order[j], order[j - 1]);
  int64_t extent = 1;
  for (int i = 0; i < n; ++i) {
    const int64_t s = std::llabs(t.strides[order[i]]);
    if (s < extent) return true;
    extent = s * t.shape[order[i]];
  }
  return false;
}
}  // namespace

void check_output(const TensorView& out, const char* arg, const TensorView& like, const char* like_arg,
                  const TensorView* const* inputs, int ninputs) {
  check_float_array(out, arg);
  BN_EXPECTS(out.device == like.device, type_error, arg, " must be on the same device as ", like_arg, " (",
             device_name(like.device), "), got ", device_name(out.device));
  check_same_shape(like, like_arg, out, arg);
  BN_EXPECTS(out.dtype == like.dtype, type_error, arg, " must have the dtype of ", like_arg, ", ",
             dtype_name(like.dtype), ", got ", dtype_name(out.dtype));
  check_writable(out, arg);
  if (out.numel() == 0) return;
  BN_EXPECTS(!self_overlapping(out), value_error, arg,
             " must not have overlapping elements (a zero or broadcast stride), got strides that repeat memory");
  intptr_t olo, ohi;
  byte_span(out, olo, ohi);
  for (int i = 0; i < ninputs; ++i) {
    const TensorView& in = *inputs[i];
    if (!in.defined() || in.numel() == 0) continue;
    intptr_t lo, hi;
    byte_span(in, lo, hi);
    const bool disjoint = ohi <= lo || hi <= olo;
    BN_EXPECTS(disjoint || (in.data == out.data && same_strides(in, out)), value_error, arg,
               " must be either the same array as an input or not overlap it, got memory that partially overlaps ",
               "an input");
  }
}

void check_eps(double eps) {
  BN_EXPECTS(std::isfinite(eps) && eps >= 0.0, value_error, "eps must be finite and >= 0, got ", eps);
}

void check_momentum(double momentum) {
  BN_EXPECTS(std::isfinite(momentum) && momentum >= 0.0 && momentum <= 1.0, value_error,
             "momentum must be a finite number in [0, 1], got ", momentum);
}

void check_internal_vector(const TensorView& t, const char* arg, int64_t n, DType dtype, const Device& device) {
  BN_EXPECTS(t.ndim == 1 && t.shape[0] == n && (t.strides[0] == 1 || n <= 1) && t.dtype == dtype &&
                 t.device == device && !t.read_only,
             value_error, "internal output ", arg, " must be a writable contiguous (", n, ",) ", dtype_name(dtype),
             " array on ", device_name(device));
}

}  // namespace batchnorm::detail
