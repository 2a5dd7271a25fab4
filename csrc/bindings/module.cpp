// batchnorm._C: the pybind11 binding of the core's ops. Each function imports its arrays
// (dlpack.h, through CallArrays), asks the core for its outputs' specs (which validates the
// inputs), allocates from them the outputs it is not given, releases the GIL for the op, and
// returns the outputs as NumPy arrays or DLPack Buffers; python/batchnorm turns Buffers into
// the caller's kind of array. Core errors become ValueError / TypeError / RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings/core_client.h"
#include "bindings/dlpack.h"
#include "core/errors.h"
#include "core/memory.h"
#include "core/ops.h"

#ifndef BATCHNORM_VERSION
#define BATCHNORM_VERSION "0.0.0"
#endif
#ifndef BN_BUILD_TAG
#error "BN_BUILD_TAG must be defined by the build (CMakeLists.txt)"
#endif

namespace py = pybind11;
using namespace batchnorm;
using namespace batchnorm::binding;

namespace {

struct Call {
  int64_t stream;  // DLPack consumer stream for CUDA arrays (1 = legacy default)
  bool as_numpy;   // results as NumPy arrays (the caller's x is NumPy)
  // The Python object owning `stream` (a CuPy/torch stream) or None: results allocated here
  // keep it alive, as their memory is freed on that stream.
  py::object stream_owner;
  void* exec_stream() const { return reinterpret_cast<void*>(stream); }
};

// The arrays of one call. Inputs are imported in the order the op function names them (the
// first bad argument is the one an error names), each into its parameter's view; outputs are
// the caller's arrays when given (the op checks them against the core's spec; a framework
// that keeps all memory in its own allocator, as batchnorm.torch does, passes them), else
// allocated here as the spec says. Everything imported stays so until the call returns.
class CallArrays {
 public:
  // Room for every op's arrays: growing the vector cost four allocations a call.
  explicit CallArrays(const Call& call) : call_(call) { kept_.reserve(12); }

  // `convert`: lists and objects with __array__ go through NumPy (arrays the op only reads).
  // None leaves `view` undefined (nothing to keep).
  CallArrays& in(py::handle obj, const char* arg, TensorView& view, bool convert = true) {
    if (obj.is_none()) {
      view = TensorView{};
      return *this;
    }
    kept_.push_back(import_array(obj, arg, call_.stream, convert));
    view = kept_.back()->view;
    return *this;
  }

  // A sequence of arrays, views appended in order (merge_statistics' shards).
  void in_sequence(py::handle seq, const char* name, std::vector<TensorView>& views) {
    BN_EXPECTS(py::isinstance<py::sequence>(seq) && !py::isinstance<py::str>(seq), type_error, name,
               " must be a sequence of arrays, got ", type_name(seq));
    const py::sequence s = py::reinterpret_borrow<py::sequence>(seq);
    for (size_t i = 0; i < s.size(); ++i) {
      const std::string arg = detail::concat(name, "[", i, "]");
      views.emplace_back();
      in(s[i], arg.c_str(), views.back());
      BN_EXPECTS(views.back().defined(), type_error, arg, " must be an array, got None");
    }
  }

  // An output: `given` (None: allocated from `spec`); None when the call does not produce it.
  py::object out(py::handle given, const char* arg, const OutputSpec& spec, TensorView& view) {
    if (!given.is_none()) {
      in(given, arg, view, false);
      return py::reinterpret_borrow<py::object>(given);
    }
    if (!spec.produced()) return py::none();
    const Output o = allocate(spec, call_.as_numpy, call_.stream, call_.stream_owner);
    view = o.view;
    return o.object;
  }
  // An output never given by the caller.
  py::object out(const OutputSpec& spec, TensorView& view) { return out(py::none(), "", spec, view); }

 private:
  const Call& call_;
  std::vector<ImportedPtr> kept_;
};

// The op itself, with the GIL released.
template <class Op>
auto without_gil(Op&& op) {
  py::gil_scoped_release nogil;
  return op();
}

py::tuple py_statistics(py::handle x, int axis, bool wide, Call call) {
  StatisticsParams p;
  CallArrays a(call);
  a.in(x, "x", p.x);
  p.axis = axis;
  p.wide = wide;
  p.exec.stream = call.exec_stream();
  const StatisticsSpecs s = statistics_specs(p);
  py::object mean = a.out(s.mean, p.mean);
  py::object var = a.out(s.var, p.var);
  const int64_t count = without_gil([&] { return batchnorm::statistics(p, s); });
  return py::make_tuple(mean, var, count);
}

py::tuple py_forward_training(py::handle x, py::handle weight, py::handle bias, py::handle running_mean,
                           py::handle running_var, double momentum, double eps, int axis, py::handle out,
                           py::handle batch_mean, py::handle batch_var, int64_t batch_count, Call call,
                           py::handle saved_mean_out, py::handle saved_invstd_out, py::handle residual,
                           int activation, bool running_var_unbiased, bool skip_nonfinite, bool renorm, double rmax,
                           double dmax, int64_t ghost_batch) {
  ForwardTrainingParams p;
  CallArrays a(call);
  a.in(x, "x", p.x)
      .in(residual, "residual", p.residual)
      .in(batch_mean, "batch_mean", p.batch_mean)
      .in(batch_var, "batch_var", p.batch_var)
      .in(weight, "weight", p.weight)
      .in(bias, "bias", p.bias)
      .in(running_mean, "running_mean", p.running_mean, false)  // updated in place: never a copy
      .in(running_var, "running_var", p.running_var, false);
  p.batch_count = batch_count;
  p.activation = static_cast<Activation>(activation);
  p.momentum = momentum;
  p.eps = eps;
  p.axis = axis;
  p.running_var_unbiased = running_var_unbiased;
  p.skip_nonfinite = skip_nonfinite;
  p.renorm = renorm;
  p.renorm_rmax = rmax;
  p.renorm_dmax = dmax;
  p.ghost_batch = ghost_batch;
  p.exec.stream = call.exec_stream();
  const ForwardTrainingSpecs s = forward_training_specs(p);
  py::object y = a.out(out, "out", s.y, p.y);
  py::object mean = a.out(saved_mean_out, "saved_mean_out", s.saved_mean, p.saved_mean);
  py::object invstd = a.out(saved_invstd_out, "saved_invstd_out", s.saved_invstd, p.saved_invstd);
  py::object r = a.out(s.renorm_r, p.renorm_r);
  py::object d = a.out(s.renorm_d, p.renorm_d);
  without_gil([&] { batchnorm::forward_training(p, s); });
  if (renorm) return py::make_tuple(y, mean, invstd, r, d);
  return py::make_tuple(y, mean, invstd);
}

py::object py_forward_inference(py::handle x, py::handle mean, py::handle var, py::handle weight, py::handle bias,
                             double eps, int axis, py::handle out, Call call, py::handle residual, int activation) {
  ForwardInferenceParams p;
  CallArrays a(call);
  a.in(x, "x", p.x)
      .in(residual, "residual", p.residual)
      .in(mean, "mean", p.mean)
      .in(var, "var", p.var)
      .in(weight, "weight", p.weight)
      .in(bias, "bias", p.bias);
  p.activation = static_cast<Activation>(activation);
  p.eps = eps;
  p.axis = axis;
  p.exec.stream = call.exec_stream();
  const ForwardInferenceSpecs s = forward_inference_specs(p);
  py::object y = a.out(out, "out", s.y, p.y);
  without_gil([&] { batchnorm::forward_inference(p, s); });
  return y;
}

py::tuple py_backward(py::handle dy, py::handle x, py::handle saved_mean, py::handle saved_invstd, py::handle weight,
                   int axis, py::handle out, Call call, py::handle dweight_out, py::handle dbias_out, py::handle y,
                   int activation, bool residual, py::handle dresidual_out, py::handle renorm_r,
                   py::handle renorm_d, int64_t ghost_batch) {
  BackwardParams p;
  CallArrays a(call);
  a.in(dy, "dy", p.dy)
      .in(y, "y", p.y)
      .in(x, "x", p.x)
      .in(saved_mean, "saved_mean", p.saved_mean)
      .in(saved_invstd, "saved_invstd", p.saved_invstd)
      .in(weight, "weight", p.weight)
      .in(renorm_r, "renorm r", p.renorm_r)
      .in(renorm_d, "renorm d", p.renorm_d);
  p.ghost_batch = ghost_batch;
  p.activation = static_cast<Activation>(activation);
  p.axis = axis;
  p.exec.stream = call.exec_stream();
  const BackwardSpecs s = backward_specs(p);
  py::object dx = a.out(out, "out", s.dx, p.dx);
  py::object dweight = a.out(dweight_out, "dweight_out", s.dweight, p.dweight);
  py::object dbias = a.out(dbias_out, "dbias_out", s.dbias, p.dbias);
  // The masked gradient needs a home of its own when dx is x (see core backward): then the
  // residual's gradient is computed even if not asked for.
  const bool relu = p.activation == Activation::relu;
  py::object dres = py::none();
  if (residual || (relu && !out.is_none() && p.dx.data == p.x.data && p.x.data != nullptr))
    dres = a.out(residual ? dresidual_out : py::none(), "dresidual_out", s.dresidual, p.dresidual);
  without_gil([&] { batchnorm::backward(p, s); });
  if (residual) return py::make_tuple(dx, dweight, dbias, dres);
  return py::make_tuple(dx, dweight, dbias);
}

// The outputs, when given, are the caller's (batchnorm.torch allocates them with torch).
py::tuple py_backward_reduce(py::handle dy, py::handle x, py::handle mean, py::handle invstd, int axis, Call call,
                             py::handle sum_dy_out, py::handle sum_dy_xmu_out, py::handle dweight_out,
                             py::handle dbias_out) {
  BackwardReduceParams p;
  CallArrays a(call);
  a.in(dy, "dy", p.dy).in(x, "x", p.x).in(mean, "mean", p.mean).in(invstd, "invstd", p.invstd);
  p.axis = axis;
  p.exec.stream = call.exec_stream();
  const BackwardReduceSpecs s = backward_reduce_specs(p);
  py::object sum_dy = a.out(sum_dy_out, "sum_dy_out", s.sum_dy, p.sum_dy);
  py::object sum_dy_xmu = a.out(sum_dy_xmu_out, "sum_dy_xmu_out", s.sum_dy_xmu, p.sum_dy_xmu);
  py::object dweight = a.out(dweight_out, "dweight_out", s.dweight, p.dweight);
  py::object dbias = a.out(dbias_out, "dbias_out", s.dbias, p.dbias);
  without_gil([&] { batchnorm::backward_reduce(p, s); });
  return py::make_tuple(sum_dy, sum_dy_xmu, dweight, dbias);
}

py::object py_backward_elemt(py::handle dy, py::handle x, py::handle mean, py::handle invstd, py::handle sum_dy,
                             py::handle sum_dy_xmu, int64_t count, py::handle weight, int axis, py::handle out,
                             Call call) {
  BackwardElemtParams p;
  CallArrays a(call);
  a.in(dy, "dy", p.dy)
      .in(x, "x", p.x)
      .in(mean, "mean", p.mean)
      .in(invstd, "invstd", p.invstd)
      .in(sum_dy, "sum_dy", p.sum_dy)
      .in(sum_dy_xmu, "sum_dy_xmu", p.sum_dy_xmu)
      .in(weight, "weight", p.weight);
  p.count = count;
  p.axis = axis;
  p.exec.stream = call.exec_stream();
  const BackwardElemtSpecs s = backward_elemt_specs(p);
  py::object dx = a.out(out, "out", s.dx, p.dx);
  without_gil([&] { batchnorm::backward_elemt(p, s); });
  return dx;
}

py::tuple py_merge_statistics(py::handle means, py::handle vars, py::handle counts, Call call) {
  MergeStatisticsParams p;
  CallArrays a(call);
  a.in_sequence(means, "means", p.means);
  a.in_sequence(vars, "vars", p.vars);
  BN_EXPECTS(py::isinstance<py::sequence>(counts) && !py::isinstance<py::str>(counts), type_error,
             "counts must be a sequence of ints, got ", type_name(counts));
  const py::sequence cs = py::reinterpret_borrow<py::sequence>(counts);
  for (size_t i = 0; i < cs.size(); ++i) {
    py::object c = cs[i];
    const bool integral = PyIndex_Check(c.ptr()) && !PyBool_Check(c.ptr());
    BN_EXPECTS(integral, type_error, "counts[", i, "] must be an int, got ", type_name(c));
    int overflow = 0;  // (pybind11's cast of an int past int64 said "Unable to cast")
    const long long n = PyLong_AsLongLongAndOverflow(py::int_(c).ptr(), &overflow);
    BN_EXPECTS(overflow == 0, value_error, "counts[", i, "] must fit in 64 bits (< 2**63), got a larger int");
    p.counts.push_back(static_cast<int64_t>(n));
  }
  p.exec.stream = call.exec_stream();
  const MergeStatisticsSpecs s = merge_statistics_specs(p);
  py::object mean = a.out(s.mean, p.mean);
  py::object var = a.out(s.var, p.var);
  const int64_t total = without_gil([&] { return batchnorm::merge_statistics(p, s); });
  return py::make_tuple(mean, var, total);
}

py::tuple py_fold(py::handle kernel, py::handle conv_bias, py::handle mean, py::handle var, py::handle weight,
               py::handle bias, double eps, int axis, Call call) {
  FoldParams p;
  CallArrays a(call);
  a.in(kernel, "kernel", p.kernel)
      .in(conv_bias, "conv_bias", p.conv_bias)
      .in(mean, "mean", p.mean)
      .in(var, "var", p.var)
      .in(weight, "weight", p.weight)
      .in(bias, "bias", p.bias);
  p.eps = eps;
  p.axis = axis;
  p.exec.stream = call.exec_stream();
  const FoldSpecs s = fold_specs(p);
  py::object k = a.out(s.kernel_out, p.kernel_out);
  py::object b = a.out(s.bias_out, p.bias_out);
  without_gil([&] { batchnorm::fold(p, s); });
  return py::make_tuple(k, b);
}

py::dict py_info() {
  py::dict d;
  d["version"] = BATCHNORM_VERSION;
  d["simd"] = simd_level();
  d["threads"] = get_num_threads();
  const CudaInfo ci = cuda_info();
  py::dict cuda;
  cuda["compiled"] = ci.compiled;
  cuda["available"] = ci.available;
  cuda["devices"] = ci.devices;
  cuda["reason"] = ci.reason;
  d["cuda"] = cuda;
  return d;
}

// The device (type, index) of an array argument, for the Python layer's stream choice.
py::object py_device_of(py::handle obj, const std::string& name) {
  Device d;
  if (!array_device(obj, d, name.c_str())) return py::none();
  return py::make_tuple(d.kind == DeviceKind::cuda ? "cuda" : "cpu", d.index);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "batchnorm's native core (use the batchnorm package, not this module)";
  check_library_build(BN_BUILD_TAG, "batchnorm._C");
  // A misspelt BATCHNORM_ISA or BATCHNORM_STREAM_BYTES fails the import with its message,
  // rather than silently running another configuration than the one asked for.
  check_environment();
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
  register_buffer(m);
  py::class_<Call>(m, "Call")
      .def(py::init([](int64_t stream, bool as_numpy, py::object stream_owner) {
             return Call{stream, as_numpy, std::move(stream_owner)};
           }),
           py::arg("stream"), py::arg("as_numpy"), py::arg("stream_owner") = py::none());
  m.def("statistics", &py_statistics);
  // The trailing *_out arguments are optional (C,) outputs for callers that allocate them.
  m.def("forward_training", &py_forward_training, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("running_mean"), py::arg("running_var"), py::arg("momentum"), py::arg("eps"), py::arg("axis"),
        py::arg("out"), py::arg("batch_mean"), py::arg("batch_var"), py::arg("batch_count"), py::arg("call"),
        py::arg("saved_mean_out") = py::none(), py::arg("saved_invstd_out") = py::none(),
        py::arg("residual") = py::none(), py::arg("activation") = 0, py::arg("running_var_unbiased") = true,
        py::arg("skip_nonfinite") = false, py::arg("renorm") = false, py::arg("rmax") = 1.0, py::arg("dmax") = 0.0,
        py::arg("ghost_batch") = 0);
  // activation: 0 none, 1 relu (batchnorm.Activation's codes); residual: x's shape and dtype.
  m.def("forward_inference", &py_forward_inference, py::arg("x"), py::arg("mean"), py::arg("var"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("axis"), py::arg("out"), py::arg("call"),
        py::arg("residual") = py::none(), py::arg("activation") = 0);
  m.def("backward", &py_backward, py::arg("dy"), py::arg("x"), py::arg("saved_mean"), py::arg("saved_invstd"),
        py::arg("weight"), py::arg("axis"), py::arg("out"), py::arg("call"), py::arg("dweight_out") = py::none(),
        py::arg("dbias_out") = py::none(), py::arg("y") = py::none(), py::arg("activation") = 0,
        py::arg("residual") = false, py::arg("dresidual_out") = py::none(), py::arg("renorm_r") = py::none(),
        py::arg("renorm_d") = py::none(), py::arg("ghost_batch") = 0);
  m.def("backward_reduce", &py_backward_reduce, py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("invstd"),
        py::arg("axis"), py::arg("call"), py::arg("sum_dy_out") = py::none(), py::arg("sum_dy_xmu_out") = py::none(),
        py::arg("dweight_out") = py::none(), py::arg("dbias_out") = py::none());
  m.def("backward_elemt", &py_backward_elemt);
  m.def("merge_statistics", &py_merge_statistics);
  m.def("fold", &py_fold);
  m.def("info", &py_info);
  // The four dtype names in core/dtype.h's order: a name's index is its code.
  m.def("dtype_names", [] {
    py::tuple names(kNumDTypes);
    for (int i = 0; i < kNumDTypes; ++i) names[i] = kDTypes[i].name;
    return names;
  });
  m.def("device_of", &py_device_of, py::arg("obj"), py::arg("name") = "array");
  m.def("set_num_threads", [](py::handle n) {
    BN_EXPECTS(PyIndex_Check(n.ptr()) && !PyBool_Check(n.ptr()), type_error, "n must be an int >= 1, got ",
               type_name(n));
    // Any int, however large, is a value to judge, not a failed conversion.
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(n.ptr(), &overflow);
    if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
    const std::string shown = py::str(n).cast<std::string>();
    BN_EXPECTS(overflow >= 0 && (overflow > 0 || v >= 1), value_error, "n must be an int >= 1, got ", shown);
    BN_EXPECTS(overflow == 0 && v <= 1 << 16, value_error, "n must be at most 65536, got ", shown);
    set_num_threads(static_cast<int>(v));
  });
  m.def("get_num_threads", &get_num_threads);
  m.def("empty_cache", [] { return release_cached_memory(); });
  // Testing hook (not part of the API): the output size above which stores are non-temporal,
  // so tests reach the streaming paths on small arrays; a negative value restores the default.
  m.def("_set_stream_threshold", &set_stream_threshold_bytes, py::arg("bytes"));
  m.def("_stream_threshold", &stream_threshold_bytes);
  m.def("_store_probe", &store_probe_ratio);
}
