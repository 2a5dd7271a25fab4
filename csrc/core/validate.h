// Argument checks shared by every op: each names the argument, what was expected and what
// arrived, and throws value_error (values, shapes) or type_error (types, dtypes, devices).
#pragma once
#include "core/tensor.h"

namespace batchnorm::detail {

// A float array of any of the four dtypes.
void check_float_array(const TensorView& t, const char* arg);
// b lives on the same device as a (named a_arg).
void check_same_device(const TensorView& a, const char* a_arg, const TensorView& b, const char* b_arg);
// A per-channel parameter: 1-D of length `channels`, any float dtype, on `device`.
void check_channel_vector(const TensorView& t, const char* arg, int64_t channels, const Device& device,
                          const char* device_arg);
// A writable, non-read-only per-channel vector (running statistics).
void check_writable(const TensorView& t, const char* arg);
// b has exactly a's shape.
void check_same_shape(const TensorView& a, const char* a_arg, const TensorView& b, const char* b_arg);
// An output like `like`: same shape, dtype and device, writable, and not partially
// overlapping any of `inputs` (exact aliasing with identical strides is allowed).
void check_output(const TensorView& out, const char* arg, const TensorView& like, const char* like_arg,
                  const TensorView* const* inputs, int ninputs);
void check_eps(double eps);
void check_momentum(double momentum);
// An internal output buffer: (n,), dtype, contiguous, on device.
void check_internal_vector(const TensorView& t, const char* arg, int64_t n, DType dtype, const Device& device);

}  // namespace batchnorm::detail
