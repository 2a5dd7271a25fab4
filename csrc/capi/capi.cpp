// The C ABI of include/batchnorm/batchnorm.h: each function only translates its DLTensors
// into TensorViews (NULL: not given) and calls the core op (core/ops.h), which validates every
// argument before writing anything. guarded() keeps every exception inside. The plain
// forward / backward functions are their *_ex versions with default options.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "batchnorm/batchnorm.h"
#include "capi/guard.h"
#include "core/dlpack.h"
#include "core/errors.h"
#include "core/ops.h"

namespace batchnorm::capi {

std::string& last_error() {
  thread_local std::string message;
  return message;
}

namespace {

// An optional argument: NULL is "not given".
TensorView optional(const DLTensor* t, const char* arg) { return t ? view_of_dltensor(*t, arg) : TensorView{}; }

// A required argument: NULL is the TypeError Python gives for None, in C's word for nothing.
TensorView required(const DLTensor* t, const char* arg) {
  BN_EXPECTS(t != nullptr, type_error, arg, " must be an array, got NULL");
  return view_of_dltensor(*t, arg);
}

// The size of each options struct in 1.1, the first version to have it: the least a caller
// can pass. Members appended later lie beyond it.
template <class Options>
constexpr size_t first_size() {
  return offsetof(Options, reserved0) + sizeof(int32_t);
}

// The caller's options as this library knows them (header comment "options structs"): NULL is
// every default; members beyond the caller's struct_size keep their default (zero); members
// the caller has and this library does not know must be zero. Nothing is read past struct_size.
template <class Options>
Options read_options(const Options* given, const char* type, const char* init) {
  Options o;
  std::memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  if (!given) return o;
  const size_t size = given->struct_size;
  // A garbage size (an uninitialized struct) is refused before anything past it is read.
  BN_EXPECTS(size >= first_size<Options>() && size <= 4096, value_error, "options->struct_size must be sizeof(",
             type, ") (", sizeof(Options), " in batchnorm ", BN_VERSION_MAJOR, ".", BN_VERSION_MINOR,
             "; at least ", first_size<Options>(), "), got ", size, ": initialize the options with ", init);
  const auto* bytes = reinterpret_cast<const unsigned char*>(given);
  BN_EXPECTS(std::all_of(bytes + std::min(size, sizeof o), bytes + size, [](unsigned char b) { return b == 0; }),
             value_error, "options (", type, ", struct_size ", size, ") sets members that this libbatchnorm (",
             BN_VERSION_MAJOR, ".", BN_VERSION_MINOR, ", ", sizeof o,
             " bytes) does not know: the program needs a newer libbatchnorm");
  std::memcpy(&o, given, std::min(size, sizeof o));
  o.struct_size = sizeof o;
  BN_EXPECTS(o.reserved0 == 0, value_error, "options->reserved0 must be 0, got ", o.reserved0);
  return o;
}

// A 0/1 flag of the options (int32_t in C): any other value is refused, not read as true, so
// a later version may give the other values a meaning.
bool flag(int32_t v, const char* member) {
  BN_EXPECTS(v == 0 || v == 1, value_error, "options->", member, " must be 0 or 1, got ", v);
  return v == 1;
}

// The options structs end on an 8-byte member: no tail padding, whose bytes a caller could not
// be expected to zero (read_options checks those past the library's size), on 32- and 64-bit.
static_assert(sizeof(bn_training_options) == offsetof(bn_training_options, renorm_d_out) + sizeof(DLTensor*));
static_assert(sizeof(bn_backward_options) == offsetof(bn_backward_options, ghost_batch) + sizeof(int64_t));

// The public functions' guarded(): the core's word for an argument not given, Python's "got
// None" (arrays required only with an option: y with the ReLU, the running statistics with
// renorm), in C's, "got NULL", as required() says it. (Same length: no allocation.)
template <class F>
bn_status c_guarded(F&& work) noexcept {
  const bn_status status = guarded(static_cast<F&&>(work));
  if (status != BN_OK) {
    std::string& message = last_error();
    for (size_t at = message.find("got None"); at != std::string::npos; at = message.find("got None", at))
      message.replace(at + 4, 4, "NULL");
  }
  return status;
}

}  // namespace
}  // namespace batchnorm::capi

using namespace batchnorm;
using batchnorm::capi::flag;
using batchnorm::capi::c_guarded;
using batchnorm::capi::optional;
using batchnorm::capi::read_options;
using batchnorm::capi::required;

extern "C" {

BN_API int bn_version(void) {
  capi::last_error().clear();  // a success, as every bn_ call's (bn_last_error)
  return BN_VERSION;
}

BN_API const char* bn_last_error(void) { return batchnorm::capi::last_error().c_str(); }

BN_API bn_status bn_statistics(const DLTensor* x, int axis, DLTensor* mean, DLTensor* var, int64_t* count,
                               void* stream) {
  return c_guarded([&] {
    StatisticsParams p;
    p.x = required(x, "x");
    p.axis = axis;
    p.mean = required(mean, "mean");
    p.var = required(var, "var");
    p.exec.stream = stream;
    const int64_t n = statistics(p);
    if (count) *count = n;
  });
}

BN_API bn_status bn_merge_statistics(int64_t num_shards, const DLTensor* const* means, const DLTensor* const* vars,
                                     const int64_t* counts, DLTensor* mean, DLTensor* var, int64_t* count,
                                     void* stream) {
  return c_guarded([&] {
    BN_EXPECTS(num_shards >= 0, value_error, "num_shards must be >= 0, got ", num_shards);
    BN_EXPECTS(num_shards == 0 || (means && vars && counts), type_error,
               "means, vars and counts must be arrays of num_shards entries, got NULL for ",
               !means ? "means" : !vars ? "vars" : "counts");
    MergeStatisticsParams p;
    for (int64_t i = 0; i < num_shards; ++i) {
      const std::string mi = detail::concat("means[", i, "]"), vi = detail::concat("vars[", i, "]");
      p.means.push_back(required(means[i], mi.c_str()));
      p.vars.push_back(required(vars[i], vi.c_str()));
      p.counts.push_back(counts[i]);
    }
    p.mean = required(mean, "mean");
    p.var = required(var, "var");
    p.exec.stream = stream;
    const int64_t n = merge_statistics(p);
    if (count) *count = n;
  });
}

BN_API bn_status bn_forward_training(const DLTensor* x, const DLTensor* weight, const DLTensor* bias,
                                     DLTensor* running_mean, DLTensor* running_var, double momentum, double eps,
                                     int axis, DLTensor* out, DLTensor* saved_mean, DLTensor* saved_invstd,
                                     void* stream) {
  return bn_forward_training_ex(x, weight, bias, running_mean, running_var, momentum, eps, axis, nullptr, out,
                                saved_mean, saved_invstd, stream);
}

BN_API bn_status bn_forward_training_ex(const DLTensor* x, const DLTensor* weight, const DLTensor* bias,
                                        DLTensor* running_mean, DLTensor* running_var, double momentum,
                                        double eps, int axis, const bn_training_options* options, DLTensor* out,
                                        DLTensor* saved_mean, DLTensor* saved_invstd, void* stream) {
  return c_guarded([&] {
    const bn_training_options o = read_options(options, "bn_training_options", "BN_TRAINING_OPTIONS_INIT");
    ForwardTrainingParams p;
    p.x = required(x, "x");
    p.weight = optional(weight, "weight");
    p.bias = optional(bias, "bias");
    p.running_mean = optional(running_mean, "running_mean");
    p.running_var = optional(running_var, "running_var");
    p.momentum = momentum;
    p.eps = eps;
    p.axis = axis;
    p.y = required(out, "out");
    p.saved_mean = required(saved_mean, "saved_mean");
    p.saved_invstd = required(saved_invstd, "saved_invstd");
    p.residual = optional(o.residual, "residual");
    p.activation = static_cast<Activation>(o.activation);
    p.running_var_unbiased = !flag(o.running_var_biased, "running_var_biased");
    p.skip_nonfinite = flag(o.skip_nonfinite, "skip_nonfinite");
    p.ghost_batch = o.ghost_batch;
    // renorm is on when either limit is set; the core then checks rmax >= 1 and dmax >= 0.
    p.renorm = o.renorm_rmax != 0.0 || o.renorm_dmax != 0.0;
    p.renorm_rmax = o.renorm_rmax;
    p.renorm_dmax = o.renorm_dmax;
    p.renorm_r = p.renorm ? required(o.renorm_r_out, "renorm_r_out") : optional(o.renorm_r_out, "renorm_r_out");
    p.renorm_d = p.renorm ? required(o.renorm_d_out, "renorm_d_out") : optional(o.renorm_d_out, "renorm_d_out");
    p.exec.stream = stream;
    forward_training(p);
  });
}

BN_API bn_status bn_forward_inference(const DLTensor* x, const DLTensor* mean, const DLTensor* var,
                                      const DLTensor* weight, const DLTensor* bias, double eps, int axis,
                                      DLTensor* out, void* stream) {
  return bn_forward_inference_ex(x, mean, var, weight, bias, eps, axis, nullptr, out, stream);
}

BN_API bn_status bn_forward_inference_ex(const DLTensor* x, const DLTensor* mean, const DLTensor* var,
                                         const DLTensor* weight, const DLTensor* bias, double eps, int axis,
                                         const bn_inference_options* options, DLTensor* out, void* stream) {
  return c_guarded([&] {
    const bn_inference_options o = read_options(options, "bn_inference_options", "BN_INFERENCE_OPTIONS_INIT");
    ForwardInferenceParams p;
    p.x = required(x, "x");
    p.mean = required(mean, "mean");
    p.var = required(var, "var");
    p.weight = optional(weight, "weight");
    p.bias = optional(bias, "bias");
    p.eps = eps;
    p.axis = axis;
    p.y = required(out, "out");
    p.residual = optional(o.residual, "residual");
    p.activation = static_cast<Activation>(o.activation);
    p.exec.stream = stream;
    forward_inference(p);
  });
}

BN_API bn_status bn_backward(const DLTensor* dy, const DLTensor* x, const DLTensor* saved_mean,
                             const DLTensor* saved_invstd, const DLTensor* weight, int axis, DLTensor* out,
                             DLTensor* dweight, DLTensor* dbias, void* stream) {
  return bn_backward_ex(dy, x, saved_mean, saved_invstd, weight, axis, nullptr, out, dweight, dbias, stream);
}

BN_API bn_status bn_backward_ex(const DLTensor* dy, const DLTensor* x, const DLTensor* saved_mean,
                                const DLTensor* saved_invstd, const DLTensor* weight, int axis,
                                const bn_backward_options* options, DLTensor* out, DLTensor* dweight,
                                DLTensor* dbias, void* stream) {
  return c_guarded([&] {
    const bn_backward_options o = read_options(options, "bn_backward_options", "BN_BACKWARD_OPTIONS_INIT");
    BackwardParams p;
    p.dy = required(dy, "dy");
    p.x = required(x, "x");
    p.saved_mean = required(saved_mean, "saved_mean");
    p.saved_invstd = required(saved_invstd, "saved_invstd");
    p.weight = optional(weight, "weight");
    p.axis = axis;
    p.dx = required(out, "out");
    p.dweight = required(dweight, "dweight");
    p.dbias = required(dbias, "dbias");
    p.y = optional(o.y, "y");
    p.activation = static_cast<Activation>(o.activation);
    p.dresidual = optional(o.dresidual_out, "dresidual_out");
    p.renorm_r = optional(o.renorm_r, "renorm_r");
    p.renorm_d = optional(o.renorm_d, "renorm_d");
    p.ghost_batch = o.ghost_batch;
    p.exec.stream = stream;
    backward(p);
  });
}

BN_API bn_status bn_fold(const DLTensor* kernel, const DLTensor* conv_bias, const DLTensor* mean,
                         const DLTensor* var, const DLTensor* weight, const DLTensor* bias, double eps, int axis,
                         DLTensor* kernel_out, DLTensor* bias_out, void* stream) {
  return c_guarded([&] {
    FoldParams p;
    p.kernel = required(kernel, "kernel");
    p.conv_bias = optional(conv_bias, "conv_bias");
    p.mean = required(mean, "mean");
    p.var = required(var, "var");
    p.weight = optional(weight, "weight");
    p.bias = optional(bias, "bias");
    p.eps = eps;
    p.axis = axis;
    p.kernel_out = required(kernel_out, "kernel_out");
    p.bias_out = required(bias_out, "bias_out");
    p.exec.stream = stream;
    fold(p);
  });
}

BN_API bn_status bn_set_num_threads(int n) {
  return c_guarded([&] { set_num_threads(n); });
}

BN_API int bn_get_num_threads(void) {
  capi::last_error().clear();
  return get_num_threads();
}

}  // extern "C"
