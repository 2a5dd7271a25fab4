// The C ABI of include/batchnorm/batchnorm.h: each function only translates its DLTensors
// into TensorViews (NULL: not given) and calls the core op (core/ops.h), which validates every
// argument before writing anything. guarded() keeps every exception inside.
#include <cstdint>
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

}  // namespace
}  // namespace batchnorm::capi

using namespace batchnorm;
using batchnorm::capi::guarded;
using batchnorm::capi::optional;
using batchnorm::capi::required;

extern "C" {

BN_API int bn_version(void) { return BN_VERSION; }

BN_API const char* bn_last_error(void) { return batchnorm::capi::last_error().c_str(); }

BN_API bn_status bn_statistics(const DLTensor* x, int axis, DLTensor* mean, DLTensor* var, int64_t* count,
                               void* stream) {
  return guarded([&] {
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
  return guarded([&] {
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
  return guarded([&] {
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
    p.exec.stream = stream;
    forward_training(p);
  });
}

BN_API bn_status bn_forward_inference(const DLTensor* x, const DLTensor* mean, const DLTensor* var,
                                      const DLTensor* weight, const DLTensor* bias, double eps, int axis,
                                      DLTensor* out, void* stream) {
  return guarded([&] {
    ForwardInferenceParams p;
    p.x = required(x, "x");
    p.mean = required(mean, "mean");
    p.var = required(var, "var");
    p.weight = optional(weight, "weight");
    p.bias = optional(bias, "bias");
    p.eps = eps;
    p.axis = axis;
    p.y = required(out, "out");
    p.exec.stream = stream;
    forward_inference(p);
  });
}

BN_API bn_status bn_backward(const DLTensor* dy, const DLTensor* x, const DLTensor* saved_mean,
                             const DLTensor* saved_invstd, const DLTensor* weight, int axis, DLTensor* out,
                             DLTensor* dweight, DLTensor* dbias, void* stream) {
  return guarded([&] {
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
    p.exec.stream = stream;
    backward(p);
  });
}

BN_API bn_status bn_fold(const DLTensor* kernel, const DLTensor* conv_bias, const DLTensor* mean,
                         const DLTensor* var, const DLTensor* weight, const DLTensor* bias, double eps, int axis,
                         DLTensor* kernel_out, DLTensor* bias_out, void* stream) {
  return guarded([&] {
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
  return guarded([&] { set_num_threads(n); });
}

BN_API int bn_get_num_threads(void) { return get_num_threads(); }

}  // extern "C"
