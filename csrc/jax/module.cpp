// batchnorm._jax: what python/batchnorm/jax needs from C++. `registrations()` hands the FFI
// handlers (handlers.cpp) to jax.ffi.register_ffi_target; the check_* functions run the core's
// own input checks (the ops' specs functions) on shapes and dtypes alone, so a traced call
// raises exactly the eager API's ValueError / TypeError before any XLA program is built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "core/errors.h"
#include "core/ops.h"
#include "core/validate.h"
#include "bindings/core_client.h"
#include "jax/handlers.h"

namespace py = pybind11;
using namespace batchnorm;

namespace {

// An array as jax describes it while tracing: (shape, dtype name), or None.
using Spec = std::optional<std::tuple<std::vector<int64_t>, std::string>>;

// Views of arrays that do not exist: distinct, aligned, never-read addresses, so the core's
// aliasing checks see separate arrays, as XLA's buffers are.
class Phantoms {
 public:
  TensorView array(const Spec& spec, const char* arg) {
    if (!spec) return TensorView{};
    const auto& [shape, dtype] = *spec;
    TensorView v;
    v.dtype = dtype_from_name(dtype.c_str(), arg);
    check_rank_limit(static_cast<int64_t>(shape.size()), arg);
    v.ndim = static_cast<int>(shape.size());
    int64_t step = 1;
    for (int d = v.ndim - 1; d >= 0; --d) {
      v.shape[d] = shape[d];
      v.strides[d] = step;
      step *= shape[d];
    }
    place(v, step);
    return v;
  }

 private:
  void place(TensorView& v, int64_t numel) {
    v.data = reinterpret_cast<void*>(next_);
    next_ += (static_cast<uintptr_t>(numel) * dtype_size(v.dtype) + 4095) / 4096 * 4096 + 4096;
  }
  uintptr_t next_ = uintptr_t(1) << 32;
};

// What the Python side sizes its outputs with: (axis in [0, ndim), channels, accumulation dtype).
py::tuple summary(const TensorView& x, int axis) {
  return py::make_tuple(axis, x.shape[axis], dtype_name(accumulation_dtype(x.dtype)));
}

// residual and activation: the fused op's (activation as the core's code); the training
// variants as the core takes them (renorm with rmax / dmax, ghost_batch 0 for off).
py::tuple check_forward_training(const Spec& x_spec, const Spec& weight, const Spec& bias, const Spec& running_mean,
                                 const Spec& running_var, double momentum, double eps, int axis, const Spec& residual,
                                 int activation, bool running_var_unbiased, bool skip_nonfinite, bool renorm,
                                 double rmax, double dmax, int64_t ghost_batch) {
  Phantoms mem;
  ForwardTrainingParams p;
  p.x = mem.array(x_spec, "x");
  p.weight = mem.array(weight, "weight");
  p.bias = mem.array(bias, "bias");
  p.running_mean = mem.array(running_mean, "running_mean");
  p.running_var = mem.array(running_var, "running_var");
  p.momentum = momentum;
  p.eps = eps;
  p.axis = axis;
  p.residual = mem.array(residual, "residual");
  p.activation = static_cast<Activation>(activation);
  p.running_var_unbiased = running_var_unbiased;
  p.skip_nonfinite = skip_nonfinite;
  p.renorm = renorm;
  p.renorm_rmax = rmax;
  p.renorm_dmax = dmax;
  p.ghost_batch = ghost_batch;
  return summary(p.x, forward_training_specs(p).axis);
}

// mean_arg / var_arg: the statistics' names in the caller's API (batch_norm's running_mean and
// running_var), checked under those names by the core's own check before the op's.
py::tuple check_forward_inference(const Spec& x_spec, const Spec& mean, const Spec& var, const Spec& weight,
                                  const Spec& bias, double eps, int axis, const std::string& mean_arg,
                                  const std::string& var_arg, const Spec& residual, int activation) {
  Phantoms mem;
  ForwardInferenceParams p;
  p.x = mem.array(x_spec, "x");
  p.mean = mem.array(mean, mean_arg.c_str());
  p.var = mem.array(var, var_arg.c_str());
  p.weight = mem.array(weight, "weight");
  p.bias = mem.array(bias, "bias");
  p.eps = eps;
  p.axis = axis;
  p.residual = mem.array(residual, "residual");
  p.activation = static_cast<Activation>(activation);
  // x itself first (its rank and axis), then the statistics under the caller's names.
  const detail::ChannelSource source{p.x, "x", detail::check_input(p.x, "x", axis)};
  detail::check_channel_vector(p.mean, mean_arg.c_str(), source);
  detail::check_channel_vector(p.var, var_arg.c_str(), source);
  return summary(p.x, forward_inference_specs(p).axis);
}

// The shape of forward_training's saved statistics for x, as the core sizes them ((C,), or
// ghost batch norm's (N / ghost_batch, C)): what batchnorm.jax gives the FFI call's results.
py::tuple saved_shape(const Spec& x_spec, int axis, int64_t ghost_batch) {
  Phantoms mem;
  ForwardTrainingParams p;
  p.x = mem.array(x_spec, "x");
  p.axis = axis;
  p.ghost_batch = ghost_batch;
  const OutputSpec s = forward_training_specs(p).saved_mean;
  return py::tuple(py::cast(std::vector<int64_t>(s.shape, s.shape + s.ndim)));
}

py::capsule capsule(XLA_FFI_Error* (*handler)(XLA_FFI_CallFrame*)) {
  return py::capsule(reinterpret_cast<void*>(handler));
}

// {target name: {platform: handler capsule}}, platform as jax.ffi.register_ffi_target names it.
py::dict registrations() {
  py::dict targets;
#define BN_JAX_TARGET(name)                                        \
  {                                                                \
    py::dict platforms;                                            \
    platforms["cpu"] = capsule(bn_jax_##name##_cpu);               \
    BN_JAX_CUDA_ENTRY(name)                                        \
    targets["batchnorm_" #name] = platforms;                       \
  }
#if defined(BN_WITH_CUDA)
#define BN_JAX_CUDA_ENTRY(name) platforms["CUDA"] = capsule(bn_jax_##name##_cuda);
#else
#define BN_JAX_CUDA_ENTRY(name)
#endif
  BN_JAX_TARGET(statistics)
  BN_JAX_TARGET(merge)
  BN_JAX_TARGET(forward_training)
  BN_JAX_TARGET(forward_inference)
  BN_JAX_TARGET(backward)
#undef BN_JAX_TARGET
#undef BN_JAX_CUDA_ENTRY
  return targets;
}

}  // namespace

PYBIND11_MODULE(_jax, m) {
  m.doc() = "batchnorm's XLA FFI handlers and trace-time checks (use batchnorm.jax, not this module)";
  check_library_build(BN_BUILD_TAG, "batchnorm._jax");  // the core's structs cross into libbatchnorm
  py::register_exception_translator([](std::exception_ptr e) {
    try {
      if (e) std::rethrow_exception(e);
    } catch (const batchnorm::type_error& err) {
      PyErr_SetString(PyExc_TypeError, err.what());
    } catch (const batchnorm::value_error& err) {
      PyErr_SetString(PyExc_ValueError, err.what());
    } catch (const batchnorm::runtime_error& err) {
      PyErr_SetString(PyExc_RuntimeError, err.what());
    }
  });
  m.def("registrations", &registrations);
  m.def("ffi_api_version", [] { return py::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR); });
  m.def("check_forward_training", &check_forward_training, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("running_mean"), py::arg("running_var"), py::arg("momentum"), py::arg("eps"), py::arg("axis"),
        py::arg("residual") = py::none(), py::arg("activation") = 0, py::arg("running_var_unbiased") = true,
        py::arg("skip_nonfinite") = false, py::arg("renorm") = false, py::arg("rmax") = 1.0, py::arg("dmax") = 0.0,
        py::arg("ghost_batch") = 0);
  m.def("saved_shape", &saved_shape, py::arg("x"), py::arg("axis"), py::arg("ghost_batch"));
  m.def("check_forward_inference", &check_forward_inference, py::arg("x"), py::arg("mean"), py::arg("var"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("axis"), py::arg("mean_arg") = "mean",
        py::arg("var_arg") = "var", py::arg("residual") = py::none(), py::arg("activation") = 0);
}
