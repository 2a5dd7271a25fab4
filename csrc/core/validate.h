// Argument checks shared by every op: each names the argument, what was expected and what
// arrived, and throws value_error (values, shapes) or type_error (types, dtypes, devices).
#pragma once
#include "core/tensor.h"

namespace batchnorm::detail {

// A float array of any of the four dtypes.
void check_float_array(const TensorView& t, const char* arg);
// An op's main input (x, or fold's kernel): a float array of rank >= min_rank with `axis` in
// range (an empty batch is the op's to judge). Returns the normalized axis.
int check_input(const TensorView& x, const char* arg, int axis, int min_rank = 2);
// b lives on the same device as a (named a_arg).
void check_same_device(const TensorView& a, const char* a_arg, const TensorView& b, const char* b_arg);
// The array whose channel axis sizes the per-channel arguments, for their messages: a
// mismatch names x's shape and axis, since a wrong axis on NHWC data shows up there first.
struct ChannelSource {
  const TensorView& x;
  const char* name;
  int axis;  // normalized
  int64_t channels() const { return x.shape[axis]; }
};
// A per-channel parameter: 1-D of length source.channels(), any float dtype, on x's device.
void check_channel_vector(const TensorView& t, const char* arg, const ChannelSource& source);
// A writable, non-read-only per-channel vector (running statistics).
void check_writable(const TensorView& t, const char* arg);
// b has exactly a's shape.
void check_same_shape(const TensorView& a, const char* a_arg, const TensorView& b, const char* b_arg);
// Same shape, dtype and strides (a dim of extent 1 takes any stride): one walk serves both.
bool same_strides(const TensorView& a, const TensorView& b);
// An argument with its name, for the overlap checks' messages.
struct Named {
  const TensorView& view;
  const char* name;
};
// An output like `like`: same shape, dtype and device, writable, and sharing no element with
// any of `inputs` unless it is exactly that input (same data and strides: in place).
void check_output(const TensorView& out, const char* arg, const TensorView& like, const char* like_arg,
                  const Named* inputs, int ninputs);
// The per-channel outputs (statistics, parameter gradients, fold's bias) are written while
// the op's other arguments are read or written: each shares no memory with any of `others`
// nor with another of `vectors` (an exact alias is no exception: unlike y, they are not
// computed element by element from the same element of an input).
void check_apart(const Named* vectors, int nvectors, const Named* others, int nothers);
// A written argument that is exactly one of `others` (same data and strides: element by element
// in place) or shares no element with it.
void check_in_place_or_disjoint(const TensorView& written, const char* arg, const Named* others, int nothers);
// A written argument (running statistics) that shares no element with any of `others`: it is
// written while they are read (or written), so even an exact alias would corrupt a result.
void check_disjoint(const TensorView& written, const char* arg, const Named* others, int nothers);
void check_eps(double eps);
void check_momentum(double momentum);

}  // namespace batchnorm::detail
