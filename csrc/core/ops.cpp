// The op layer: each op's specs function validates its inputs once and sizes its outputs
// (the only place output shapes are decided); the op then checks the given outputs against
// those specs, builds the layout and routes to the backend of the arrays' device. Nothing is
// written before all checks have passed, so a failed call leaves running statistics and
// outputs untouched.
#include "core/ops.h"

#include <cstdint>

#include "core/backend.h"
#include "core/errors.h"
#include "core/ghost.h"
#include "core/route.h"
#include "core/validate.h"

namespace batchnorm {

using namespace detail;

namespace {

void check_optional_vector(const TensorView& t, const char* arg, const ChannelSource& source) {
  if (t.defined()) check_channel_vector(t, arg, source);
}

void check_cuda_usable(const TensorView& x, const char* arg) {
  if (!on_cuda(x)) return;
  const Backend* cuda = cuda_backend();
  BN_EXPECTS(cuda != nullptr, type_error, arg, " is on ", device_name(x.device),
             " but this build of batchnorm has no CUDA backend (built without a CUDA compiler); "
             "pass a CPU array or rebuild with BATCHNORM_CUDA=ON");
  const CudaInfo ci = cuda->info();
  BN_EXPECTS(ci.available, runtime_error, arg, " is on ", device_name(x.device), " but CUDA is unavailable: ",
             ci.reason);
}

void check_channels(int64_t channels, const TensorView& x, const char* arg) {
  BN_EXPECTS(channels >= 1, value_error, arg, " must have at least one channel, got shape ", shape_string(x));
}

void check_count(int64_t count, int64_t channels, const TensorView& x, const char* arg, int64_t minimum,
                 const char* why) {
  BN_EXPECTS(count >= minimum, value_error, arg, " must have at least ", minimum, " value", minimum == 1 ? "" : "s",
             " per channel ", why, ", got ", count, " (shape ", shape_string(x), ", ", channels, " channels)");
}

// A second array of x's shape, dtype and device (the residual of a fused op, the y of its
// backward).
void check_like_x(const TensorView& t, const char* arg, const TensorView& x) {
  check_float_array(t, arg);
  check_same_device(x, "x", t, arg);
  check_same_shape(x, "x", t, arg);
  BN_EXPECTS(t.dtype == x.dtype, type_error, arg, " must have the dtype of x, ", dtype_name(x.dtype), ", got ",
             dtype_name(t.dtype));
}

void check_activation(Activation a) {
  BN_EXPECTS(a == Activation::none || a == Activation::relu, value_error,
             "activation must be None or 'relu', got code ", static_cast<int>(a));
}

// The fused forward's extra arguments: an optional residual like x, and the activation.
void check_fusion(const TensorView& x, const TensorView& residual, Activation activation) {
  check_activation(activation);
  if (residual.defined()) check_like_x(residual, "residual", x);
}

// The forward's walk: x, the residual when given, y.
Layout forward_layout(int axis, const TensorView& x, const TensorView& residual, const TensorView& y) {
  if (residual.defined()) {
    const TensorView* arrays[] = {&x, &residual, &y};
    return make_layout(axis, arrays, 3);
  }
  const TensorView* arrays[] = {&x, &y};
  return make_layout(axis, arrays, 2);
}

// The values per channel of x (the product of its other dimensions).
int64_t values_per_channel(const TensorView& x, int axis) {
  int64_t n = 1;
  for (int d = 0; d < x.ndim; ++d)
    if (d != axis) n *= x.shape[d];
  return n;
}

OutputSpec vector_spec(int64_t n, DType dtype, const Device& device) {
  OutputSpec s;
  s.ndim = 1;
  s.shape[0] = n;
  s.dtype = dtype;
  s.device = device;
  return s;
}

OutputSpec rows_spec(int64_t rows, int64_t n, DType dtype, const Device& device) {
  OutputSpec s = vector_spec(rows, dtype, device);
  s.ndim = 2;
  s.shape[1] = n;
  return s;
}

// An output of like's shape, dtype and device; allocated in order's memory order.
OutputSpec like_spec(const TensorView& like, const char* name, const TensorView* order = nullptr) {
  OutputSpec s;
  s.dtype = like.dtype;
  s.device = like.device;
  s.like = &like;
  s.like_name = name;
  s.order = order;
  return s;
}

// The one check of a given output against its spec: a `like` output as check_output has it
// (any strides, in place on an input or disjoint from each of `inputs`); a sized one (the
// statistics) writable and contiguous, of exactly the spec's shape, dtype and device.
void check_against(const TensorView& t, const char* arg, const OutputSpec& spec, const Named* inputs = nullptr,
                   int ninputs = 0) {
  if (spec.like) {
    check_output(t, arg, *spec.like, spec.like_name, inputs, ninputs);
    return;
  }
  bool ok = t.ndim == spec.ndim && t.dtype == spec.dtype && t.device == spec.device && !t.read_only;
  int64_t step = 1;  // C order; a dimension of extent 1 takes any stride
  for (int d = spec.ndim - 1; ok && d >= 0; --d) {
    ok = t.shape[d] == spec.shape[d] && (t.strides[d] == step || spec.shape[d] <= 1);
    step *= spec.shape[d];
  }
  if (ok) return;
  TensorView shape;
  shape.ndim = spec.ndim;
  for (int d = 0; d < spec.ndim; ++d) shape.shape[d] = spec.shape[d];
  bool contiguous = true;
  step = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    contiguous = contiguous && (t.strides[d] == step || t.shape[d] <= 1);
    step *= t.shape[d];
  }
  throw value_error(concat(arg, " must be a writable contiguous ", shape_string(shape), " ", dtype_name(spec.dtype),
                           " array on ", device_name(spec.device), ", got a ", t.read_only ? "read-only " : "",
                           contiguous ? "" : "non-contiguous ", shape_string(t), " ", dtype_name(t.dtype),
                           " array on ", device_name(t.device)));
}


// ghost_batch: a group size dividing the batch (axis 0, not the channel axis). Returns the
// number of groups, 0 without ghost batch norm, and 0 too for an empty batch with it: callers
// ask ghost_batch, not the count, whether the groups apply.
int64_t check_ghost(int64_t ghost_batch, const TensorView& x, int axis) {
  if (ghost_batch == 0) return 0;
  BN_EXPECTS(ghost_batch > 0, value_error, "ghost_batch must be a positive int (samples per group), got ",
             ghost_batch);
  BN_EXPECTS(axis != 0, value_error,
             "ghost_batch groups the samples along axis 0, which must not be the channel axis; got axis=0 "
             "for x of shape ", shape_string(x));
  BN_EXPECTS(x.shape[0] % ghost_batch == 0, value_error, "ghost_batch must divide the batch size (x.shape[0] = ",
             x.shape[0], "), got ghost_batch=", ghost_batch);
  return x.shape[0] / ghost_batch;
}

// A ghost-batch backward's saved statistics: (N / G, C), any float dtype, on x's device.
void check_group_rows(const TensorView& t, const char* arg, int64_t rows, const TensorView& x, int axis) {
  BN_EXPECTS(t.defined(), type_error, arg, " must be an array, got None");
  check_float_array(t, arg);
  check_same_device(x, "x", t, arg);
  BN_EXPECTS(t.ndim == 2 && t.shape[0] == rows && t.shape[1] == x.shape[axis], value_error, arg,
             " must have shape (", rows, ", ", x.shape[axis], ") with ghost_batch (one row per group of x of shape ",
             shape_string(x), "), got shape ", shape_string(t));
}

// The training variants' options of a forward_training call (their outputs apart).
void check_variants(const ForwardTrainingParams& p) {
  if (p.renorm) {
    BN_EXPECTS(p.renorm_rmax >= 1.0, value_error, "renorm rmax must be >= 1 (r is clipped to [1/rmax, rmax]), got ",
               p.renorm_rmax);
    BN_EXPECTS(p.renorm_dmax >= 0.0, value_error, "renorm dmax must be >= 0 (d is clipped to [-dmax, dmax]), got ",
               p.renorm_dmax);
    BN_EXPECTS(p.running_mean.defined(), value_error,
               "renorm needs running_mean and running_var (r and d compare the batch with them), got None");
    BN_EXPECTS(p.ghost_batch == 0, value_error, "renorm and ghost_batch together are not supported, got both");
  }
  if (p.ghost_batch != 0)
    BN_EXPECTS(!p.batch_mean.defined(), value_error,
               "ghost_batch and batch_statistics together are not supported (ghost statistics are per group)");
}

}  // namespace

// ---- statistics ---------------------------------------------------------------------------

StatisticsSpecs statistics_specs(const StatisticsParams& p) {
  StatisticsSpecs s;
  s.axis = check_input(p.x, "x", p.axis);
  const int64_t C = p.x.shape[s.axis];
  check_channels(C, p.x, "x");
  check_count(values_per_channel(p.x, s.axis), C, p.x, "x", 1, "to compute statistics");
  check_cuda_usable(p.x, "x");
  const bool wide = p.wide || (p.mean.defined() && p.mean.dtype == DType::float64);
  s.mean = s.var = vector_spec(C, wide ? DType::float64 : accumulation_dtype(p.x.dtype), p.x.device);
  return s;
}

int64_t statistics(const StatisticsParams& p, const StatisticsSpecs& s) {
  check_against(p.mean, "mean", s.mean);
  check_against(p.var, "var", s.var);
  const Named vectors[] = {{p.mean, "mean"}, {p.var, "var"}}, others[] = {{p.x, "x"}};
  check_apart(vectors, 2, others, 1);
  const TensorView* arrays[] = {&p.x};
  const Layout layout = make_layout(s.axis, arrays, 1);
  route(&Backend::statistics, p, p.x, layout);
  return layout.count;
}

// ---- forward ------------------------------------------------------------------------------

ForwardTrainingSpecs forward_training_specs(const ForwardTrainingParams& p) {
  ForwardTrainingSpecs s;
  const int axis = s.axis = check_input(p.x, "x", p.axis);
  const int64_t C = p.x.shape[axis];
  const ChannelSource src{p.x, "x", axis};
  check_optional_vector(p.weight, "weight", src);
  check_optional_vector(p.bias, "bias", src);
  BN_EXPECTS(p.running_mean.defined() == p.running_var.defined(), value_error,
             "running_mean and running_var must be given together, got ",
             p.running_mean.defined() ? "running_mean without running_var" : "running_var without running_mean");
  check_optional_vector(p.running_mean, "running_mean", src);
  check_optional_vector(p.running_var, "running_var", src);
  if (p.running_mean.defined()) {
    check_writable(p.running_mean, "running_mean");
    check_writable(p.running_var, "running_var");
  }
  check_eps(p.eps);
  check_momentum(p.momentum);
  const bool given = p.batch_mean.defined();
  BN_EXPECTS(given == p.batch_var.defined(), value_error,
             "batch_mean and batch_var must be given together, got ",
             given ? "batch_mean without batch_var" : "batch_var without batch_mean");
  check_optional_vector(p.batch_mean, "batch_mean", src);
  check_optional_vector(p.batch_var, "batch_var", src);
  const Named beside_mean[] = {{p.x, "x"},         {p.weight, "weight"},         {p.bias, "bias"},
                               {p.running_var, "running_var"}, {p.batch_mean, "batch_mean"}, {p.batch_var, "batch_var"}};
  const Named beside_var[] = {{p.x, "x"}, {p.weight, "weight"}, {p.bias, "bias"}, {p.batch_mean, "batch_mean"},
                              {p.batch_var, "batch_var"}};
  check_disjoint(p.running_mean, "running_mean", beside_mean, 6);
  check_disjoint(p.running_var, "running_var", beside_var, 5);
  check_fusion(p.x, p.residual, p.activation);
  if (p.running_mean.defined()) {
    const Named beside_residual[] = {{p.residual, "residual"}};
    check_disjoint(p.running_mean, "running_mean", beside_residual, 1);
    check_disjoint(p.running_var, "running_var", beside_residual, 1);
  }
  const int64_t groups = check_ghost(p.ghost_batch, p.x, axis);
  check_variants(p);
  check_channels(C, p.x, "x");
  const int64_t count = values_per_channel(p.x, axis);
  if (p.ghost_batch != 0) {
    if (groups == 0) check_count(count, C, p.x, "x", 2, "in training (the batch variance needs two)");  // empty
    const int64_t per_group = count / groups;
    BN_EXPECTS(per_group >= 2, value_error, "each ghost batch must have at least 2 values per channel in training "
               "(the batch variance needs two), got ", per_group, " (ghost_batch=", p.ghost_batch, ", x of shape ",
               shape_string(p.x), ")");
  } else if (given) {
    // x is one shard of the batch the statistics describe: it may be empty, never larger.
    BN_EXPECTS(p.batch_count >= count, value_error, "batch_count must be at least x's ", count,
               " values per channel (x is part of the batch), got ", p.batch_count);
    BN_EXPECTS(p.batch_count >= 2, value_error,
               "batch_count must be at least 2 values per channel in training (the batch variance needs two), got ",
               p.batch_count);
  } else {
    check_count(count, C, p.x, "x", 2, "in training (the batch variance needs two)");
  }
  check_cuda_usable(p.x, "x");
  // y may be x (or the residual) itself; ghost batch norm saves one row of statistics per group.
  const DType acc = accumulation_dtype(p.x.dtype);
  s.y = like_spec(p.x, "x");
  s.saved_mean = s.saved_invstd =
      p.ghost_batch != 0 ? rows_spec(groups, C, acc, p.x.device) : vector_spec(C, acc, p.x.device);
  if (p.renorm) s.renorm_r = s.renorm_d = vector_spec(C, acc, p.x.device);
  s.moments_mean = s.moments_var = vector_spec(C, DType::float64, p.x.device);
  return s;
}

void forward_training(const ForwardTrainingParams& p, const ForwardTrainingSpecs& s) {
  const Named inputs[] = {{p.x, "x"},           {p.weight, "weight"},         {p.bias, "bias"},
                          {p.running_mean, "running_mean"}, {p.running_var, "running_var"},
                          {p.batch_mean, "batch_mean"},     {p.batch_var, "batch_var"},
                          {p.residual, "residual"}};
  // Exact aliasing needs the same shape and strides, so y may be x (or the residual) itself,
  // never a parameter.
  check_against(p.y, "out", s.y, inputs, 8);
  if (p.renorm) {
    check_against(p.renorm_r, "renorm_r", s.renorm_r);
    check_against(p.renorm_d, "renorm_d", s.renorm_d);
  } else {
    BN_EXPECTS(!p.renorm_r.defined() && !p.renorm_d.defined(), value_error,
               "renorm_r and renorm_d are outputs of renorm, got them without renorm");
  }
  BN_EXPECTS(p.moments_mean.defined() == p.moments_var.defined(), value_error,
             "moments_mean and moments_var must be given together");
  if (p.moments_mean.defined()) {
    check_against(p.moments_mean, "moments_mean", s.moments_mean);
    check_against(p.moments_var, "moments_var", s.moments_var);
  }
  check_against(p.saved_mean, "saved_mean", s.saved_mean);
  check_against(p.saved_invstd, "saved_invstd", s.saved_invstd);
  const Named vectors[] = {{p.saved_mean, "saved_mean"}, {p.saved_invstd, "saved_invstd"},
                           {p.renorm_r, "renorm_r"},     {p.renorm_d, "renorm_d"},
                           {p.moments_mean, "moments_mean"}, {p.moments_var, "moments_var"}};
  const Named others[] = {{p.x, "x"},           {p.weight, "weight"},         {p.bias, "bias"},
                          {p.running_mean, "running_mean"}, {p.running_var, "running_var"},
                          {p.batch_mean, "batch_mean"},     {p.batch_var, "batch_var"},
                          {p.residual, "residual"},         {p.y, "out"}};
  check_apart(vectors, 6, others, 9);
  if (s.saved_mean.ndim == 2) {  // ghost batch norm: one row of statistics per group
    ghost_forward_training(p, s.axis);
    return;
  }
  route(&Backend::forward_training, p, p.x, forward_layout(s.axis, p.x, p.residual, p.y));
}

ForwardInferenceSpecs forward_inference_specs(const ForwardInferenceParams& p) {
  ForwardInferenceSpecs s;
  s.axis = check_input(p.x, "x", p.axis);
  BN_EXPECTS(p.mean.defined(), type_error, "mean must be an array, got None");
  BN_EXPECTS(p.var.defined(), type_error, "var must be an array, got None");
  const ChannelSource src{p.x, "x", s.axis};
  check_channel_vector(p.mean, "mean", src);
  check_channel_vector(p.var, "var", src);
  check_optional_vector(p.weight, "weight", src);
  check_optional_vector(p.bias, "bias", src);
  check_eps(p.eps);
  check_fusion(p.x, p.residual, p.activation);
  if (p.x.numel() != 0) check_cuda_usable(p.x, "x");  // an empty batch runs nothing
  s.y = like_spec(p.x, "x");
  return s;
}

void forward_inference(const ForwardInferenceParams& p, const ForwardInferenceSpecs& s) {
  const Named inputs[] = {{p.x, "x"},       {p.mean, "mean"}, {p.var, "var"},
                          {p.weight, "weight"}, {p.bias, "bias"}, {p.residual, "residual"}};
  check_against(p.y, "out", s.y, inputs, 6);
  if (p.x.numel() == 0) return;  // an empty batch gives an empty y
  route(&Backend::forward_inference, p, p.x, forward_layout(s.axis, p.x, p.residual, p.y));
}

// ---- backward -----------------------------------------------------------------------------

namespace {

// The inputs every backward op shares: dy like x, and the forward's per-channel statistics
// (named as the op's caller knows them). Returns the normalized axis.
int check_backward_inputs(const TensorView& dy, const TensorView& x, int axis_arg, const TensorView& mean,
                          const char* mean_arg, const TensorView& invstd, const char* invstd_arg,
                          int64_t ghost_batch = 0) {
  const int axis = check_input(x, "x", axis_arg);
  BN_EXPECTS(dy.defined(), type_error, "dy must be an array, got None");
  check_float_array(dy, "dy");
  check_same_device(x, "x", dy, "dy");
  check_same_shape(x, "x", dy, "dy");
  BN_EXPECTS(dy.dtype == x.dtype, type_error, "dy must have the dtype of x, ", dtype_name(x.dtype), ", got ",
             dtype_name(dy.dtype));
  if (ghost_batch != 0) {  // (an empty batch has 0 groups, and the backward's count check refuses it)
    const int64_t groups = check_ghost(ghost_batch, x, axis);
    check_group_rows(mean, mean_arg, groups, x, axis);
    check_group_rows(invstd, invstd_arg, groups, x, axis);
    return axis;
  }
  BN_EXPECTS(mean.defined(), type_error, mean_arg, " must be an array, got None");
  BN_EXPECTS(invstd.defined(), type_error, invstd_arg, " must be an array, got None");
  const ChannelSource src{x, "x", axis};
  check_channel_vector(mean, mean_arg, src);
  check_channel_vector(invstd, invstd_arg, src);
  return axis;
}

}  // namespace

BackwardSpecs backward_specs(const BackwardParams& p) {
  BackwardSpecs s;
  const int axis = s.axis = check_backward_inputs(p.dy, p.x, p.axis, p.saved_mean, "saved_mean", p.saved_invstd,
                                                  "saved_invstd", p.ghost_batch);
  const int64_t C = p.x.shape[axis];
  const ChannelSource src{p.x, "x", axis};
  check_optional_vector(p.weight, "weight", src);
  BN_EXPECTS(p.renorm_r.defined() == p.renorm_d.defined(), value_error,
             "renorm's r and d must be given together, got ", p.renorm_r.defined() ? "r without d" : "d without r");
  if (p.renorm_r.defined()) {
    BN_EXPECTS(p.ghost_batch == 0, value_error, "renorm and ghost_batch together are not supported, got both");
    check_channel_vector(p.renorm_r, "renorm r", src);
    check_channel_vector(p.renorm_d, "renorm d", src);
  }
  check_activation(p.activation);
  const bool relu = p.activation == Activation::relu;
  BN_EXPECTS(relu || !p.y.defined(), value_error,
             "y is the fused forward's output, for activation='relu' only; got y with activation None");
  BN_EXPECTS(!relu || p.y.defined(), type_error, "y must be an array (the fused forward's output) with "
             "activation='relu', got None");
  if (relu) check_like_x(p.y, "y", p.x);
  check_channels(C, p.x, "x");
  check_count(values_per_channel(p.x, axis), C, p.x, "x", 1, "for the backward pass");
  check_cuda_usable(p.x, "x");
  // dx and the residual's gradient take dy's memory order: dy is what the caller's graph made.
  const DType acc = accumulation_dtype(p.x.dtype);
  s.dx = s.dresidual = like_spec(p.x, "x", &p.dy);
  s.dweight = s.dbias = vector_spec(C, acc, p.x.device);
  return s;
}

MaskedBackward split_masked_backward(const BackwardParams& p) {
  MaskedBackward s;
  const bool relu = p.activation == Activation::relu;
  s.mask.kind = relu ? ElementwiseKind::relu_grad : ElementwiseKind::copy;
  s.mask.in0 = p.dy;
  if (relu) s.mask.in1 = p.y;
  s.mask.out = p.dresidual.defined() ? p.dresidual : p.dx;
  s.mask.exec = p.exec;
  s.plain = p;
  s.plain.dy = s.mask.out;
  s.plain.y = TensorView{};
  s.plain.activation = Activation::none;
  s.plain.dresidual = TensorView{};
  return s;
}

namespace {

// dy, x, dx and the fused backward's y and dresidual (where given) have the same strides
// (same shape already checked), so one layout walks every one of them alike.
bool walk_alike(const BackwardParams& p) {
  const TensorView* arrays[] = {&p.x, &p.dx, &p.y, &p.dresidual};
  for (const TensorView* t : arrays)
    if (t->defined() && !same_strides(*t, p.dy)) return false;
  return true;
}

// Where dy and x walk unlike, the reduction gathered one of them value by value in both of its
// passes: 32x64x56x56 float32 with dy NCHW and x NHWC took 45-53 ms against 2.3-2.8 ms alike
// (Xeon, 2 threads). When dx walks like one of them and is a separate array, the other is
// copied into dx first (one pass, transposing) and the backward runs in place on dx, every
// array alike: no temporary, and the same bits as with that input given in dx's layout.
enum class CopyFirst { none, dy, x };
CopyFirst copy_first(const BackwardParams& p) {
  if (p.ghost_batch > 0 || p.dy.numel() == 0) return CopyFirst::none;
  const bool dx_like_x = same_strides(p.dx, p.x), dx_like_dy = same_strides(p.dx, p.dy);
  if (dx_like_x && dx_like_dy) return CopyFirst::none;              // every array alike already
  if (dx_like_x && p.dx.data != p.x.data) return CopyFirst::dy;     // x is read after the copy
  if (dx_like_dy && p.dx.data != p.dy.data) return CopyFirst::x;    // dy is read after the copy
  return CopyFirst::none;
}

}  // namespace

void backward(const BackwardParams& p, const BackwardSpecs& s) {
  const int axis = s.axis;
  const bool relu = p.activation == Activation::relu;
  const Named inputs[] = {{p.dy, "dy"}, {p.x, "x"}, {p.weight, "weight"}, {p.y, "y"}, {p.renorm_r, "renorm r"},
                          {p.renorm_d, "renorm d"}};
  check_against(p.dx, "out", s.dx, inputs, 6);
  // Never the saved statistics, not even exactly: ghost groups' (N / G, C) are x's own shape for
  // a 2-D x and G = 1, and the masked route writes out before the groups read them (an exact
  // alias had passed as "in place" and given wrong dx and dweight).
  const Named saved[] = {{p.saved_mean, "saved_mean"}, {p.saved_invstd, "saved_invstd"}};
  check_disjoint(p.dx, "out", saved, 2);
  // The masked gradient g (the residual's gradient) is written first, then read by the
  // backward proper: into dresidual, or else into dx, which must then not be x (still needed).
  const bool masked = relu || p.dresidual.defined();
  if (p.dresidual.defined()) {
    const Named others[] = {{p.dy, "dy"},         {p.x, "x"},           {p.saved_mean, "saved_mean"},
                            {p.saved_invstd, "saved_invstd"}, {p.weight, "weight"}, {p.y, "y"},
                            {p.dx, "out"}};
    check_against(p.dresidual, "dresidual_out", s.dresidual, others, 1);  // may be dy itself
    check_disjoint(p.dresidual, "dresidual_out", others + 1, 6);
  } else if (relu) {
    BN_EXPECTS(p.dx.data != p.x.data || p.x.numel() == 0, value_error,
               "out must not be x in the fused backward without dresidual (x is read after the masked "
               "gradient is written to out), got out=x");
  }
  check_against(p.dweight, "dweight", s.dweight);
  check_against(p.dbias, "dbias", s.dbias);
  const Named vectors[] = {{p.dweight, "dweight"}, {p.dbias, "dbias"}};
  const Named others[] = {{p.dy, "dy"},         {p.x, "x"},           {p.saved_mean, "saved_mean"},
                          {p.saved_invstd, "saved_invstd"}, {p.weight, "weight"}, {p.y, "y"},
                          {p.renorm_r, "renorm r"}, {p.renorm_d, "renorm d"}, {p.dx, "out"},
                          {p.dresidual, "dresidual_out"}};
  check_apart(vectors, 2, others, 10);
  if (!masked) {
    if (p.ghost_batch > 0) {
      ghost_backward(p, axis);
    } else if (const CopyFirst which = copy_first(p); which != CopyFirst::none) {
      ElementwiseParams copy;
      copy.kind = ElementwiseKind::copy;
      copy.in0 = which == CopyFirst::dy ? p.dy : p.x;
      copy.out = p.dx;
      copy.exec = p.exec;
      BackwardParams in_place = p;
      (which == CopyFirst::dy ? in_place.dy : in_place.x) = p.dx;
      const TensorView* carrays[] = {&copy.in0, &copy.out};
      const TensorView* qarrays[] = {&in_place.dy, &in_place.x, &in_place.dx};
      route(&Backend::elementwise, copy, p.x, make_layout(axis, carrays, 2));
      route(&Backend::backward, in_place, p.x, make_layout(axis, qarrays, 3));
    } else {
      const TensorView* arrays[] = {&p.dy, &p.x, &p.dx};
      route(&Backend::backward, p, p.x, make_layout(axis, arrays, 3));
    }
    return;
  }
  // Fused: g = relu'(y) * dy (or dy itself) into dresidual or dx, then the plain backward of g.
  // When every array walks alike, the backend makes g range by range as its reduction reaches
  // it (read back from cache); otherwise, and for ghost batches, as two passes here.
  const TensorView* farrays[] = {&p.dy, &p.x, &p.dx};
  if (p.ghost_batch == 0 && walk_alike(p)) {
    route(&Backend::backward, p, p.x, make_layout(axis, farrays, 3));
    return;
  }
  const MaskedBackward two = split_masked_backward(p);
  const TensorView* marrays[] = {&two.mask.in0, &two.mask.in1, &two.mask.out};
  const TensorView* carrays[] = {&two.mask.in0, &two.mask.out};
  const Layout mlayout = relu ? make_layout(axis, marrays, 3) : make_layout(axis, carrays, 2);
  const TensorView* qarrays[] = {&two.plain.dy, &two.plain.x, &two.plain.dx};
  const Layout qlayout = make_layout(axis, qarrays, 3);
  route(&Backend::elementwise, two.mask, p.x, mlayout);
  if (two.plain.ghost_batch > 0)
    ghost_backward(two.plain, axis);
  else
    route(&Backend::backward, two.plain, p.x, qlayout);
}

BackwardReduceSpecs backward_reduce_specs(const BackwardReduceParams& p) {
  BackwardReduceSpecs s;
  s.axis = check_backward_inputs(p.dy, p.x, p.axis, p.mean, "mean", p.invstd, "invstd");
  const int64_t C = p.x.shape[s.axis];
  check_channels(C, p.x, "x");
  check_cuda_usable(p.x, "x");
  s.sum_dy = s.sum_dy_xmu = vector_spec(C, DType::float64, p.x.device);
  s.dweight = s.dbias = vector_spec(C, accumulation_dtype(p.x.dtype), p.x.device);
  return s;
}

void backward_reduce(const BackwardReduceParams& p, const BackwardReduceSpecs& s) {
  check_against(p.sum_dy, "sum_dy", s.sum_dy);
  check_against(p.sum_dy_xmu, "sum_dy_xmu", s.sum_dy_xmu);
  check_against(p.dweight, "dweight", s.dweight);
  check_against(p.dbias, "dbias", s.dbias);
  const Named vectors[] = {{p.sum_dy, "sum_dy"}, {p.sum_dy_xmu, "sum_dy_xmu"}, {p.dweight, "dweight"},
                           {p.dbias, "dbias"}};
  const Named others[] = {{p.dy, "dy"}, {p.x, "x"}, {p.mean, "mean"}, {p.invstd, "invstd"}};
  check_apart(vectors, 4, others, 4);
  // An empty shard contributes zeros (the backends write them).
  const TensorView* arrays[] = {&p.dy, &p.x};
  route(&Backend::backward_reduce, p, p.x, make_layout(s.axis, arrays, 2));
}

BackwardElemtSpecs backward_elemt_specs(const BackwardElemtParams& p) {
  BackwardElemtSpecs s;
  s.axis = check_backward_inputs(p.dy, p.x, p.axis, p.mean, "mean", p.invstd, "invstd");
  const int64_t C = p.x.shape[s.axis];
  const ChannelSource src{p.x, "x", s.axis};
  check_optional_vector(p.weight, "weight", src);
  BN_EXPECTS(p.sum_dy.defined(), type_error, "sum_dy must be an array, got None");
  BN_EXPECTS(p.sum_dy_xmu.defined(), type_error, "sum_dy_xmu must be an array, got None");
  check_channel_vector(p.sum_dy, "sum_dy", src);
  check_channel_vector(p.sum_dy_xmu, "sum_dy_xmu", src);
  check_channels(C, p.x, "x");
  const int64_t count = values_per_channel(p.x, s.axis);
  BN_EXPECTS(p.count >= 1 && p.count >= count, value_error, "count must be at least 1 and at least x's ", count,
             " values per channel (the total over every shard), got ", p.count);
  if (count != 0) check_cuda_usable(p.x, "x");  // an empty shard runs nothing
  s.dx = like_spec(p.x, "x", &p.dy);
  return s;
}

void backward_elemt(const BackwardElemtParams& p, const BackwardElemtSpecs& s) {
  const Named inputs[] = {{p.dy, "dy"},         {p.x, "x"},         {p.mean, "mean"},
                          {p.invstd, "invstd"}, {p.weight, "weight"}, {p.sum_dy, "sum_dy"},
                          {p.sum_dy_xmu, "sum_dy_xmu"}};
  check_against(p.dx, "out", s.dx, inputs, 7);
  const TensorView* arrays[] = {&p.dy, &p.x, &p.dx};
  const Layout layout = make_layout(s.axis, arrays, 3);
  if (layout.count == 0) return;  // an empty shard has an empty dx
  route(&Backend::backward_elemt, p, p.x, layout);
}

// ---- per-channel ops ----------------------------------------------------------------------

MergeStatisticsSpecs merge_statistics_specs(const MergeStatisticsParams& p) {
  MergeStatisticsSpecs s;
  const size_t k = p.means.size();
  BN_EXPECTS(k > 0, value_error, "means must hold at least one shard, got none");
  BN_EXPECTS(p.vars.size() == k && p.counts.size() == k, value_error,
             "means, vars and counts must have the same length, got ", k, ", ", p.vars.size(), " and ",
             p.counts.size());
  const TensorView& first = p.means[0];
  BN_EXPECTS(first.defined() && first.ndim == 1, value_error, "means[0] must have shape (C,), got ",
             first.defined() ? shape_string(first) : std::string("None"));
  const int64_t C = first.shape[0];
  const ChannelSource src{first, "means[0]", 0};
  for (size_t i = 0; i < k; ++i) {
    const std::string mi = concat("means[", i, "]"), vi = concat("vars[", i, "]");
    check_channel_vector(p.means[i], mi.c_str(), src);
    check_channel_vector(p.vars[i], vi.c_str(), src);
    BN_EXPECTS(p.counts[i] >= 0, value_error, "counts[", i, "] must be >= 0, got ", p.counts[i]);
    // The total is a count of values: it must fit the int64 it is returned in.
    BN_EXPECTS(p.counts[i] <= INT64_MAX - s.total, value_error,
               "counts must add up to at most 2**63 - 1 values, got a total beyond it at counts[", i, "]");
    s.total += p.counts[i];
  }
  BN_EXPECTS(s.total > 0, value_error, "counts must not all be zero, got ", k, " shard", k == 1 ? "" : "s",
             " with no values");
  check_cuda_usable(first, "means[0]");
  s.mean = s.var = vector_spec(C, accumulation_dtype(first.dtype), first.device);
  return s;
}

int64_t merge_statistics(const MergeStatisticsParams& p, const MergeStatisticsSpecs& s) {
  check_against(p.mean, "mean", s.mean);
  check_against(p.var, "var", s.var);
  // Each channel's shards are all read before its mean and var are written (CPU and CUDA): the
  // results may be exactly a shard's arrays (merging in place), never partly over one.
  const Named vectors[] = {{p.mean, "mean"}, {p.var, "var"}};
  check_apart(vectors, 2, nullptr, 0);
  for (size_t i = 0; i < p.means.size(); ++i) {
    const std::string mi = concat("means[", i, "]"), vi = concat("vars[", i, "]");
    const Named shard[] = {{p.means[i], mi.c_str()}, {p.vars[i], vi.c_str()}};
    check_in_place_or_disjoint(p.mean, "mean", shard, 2);
    check_in_place_or_disjoint(p.var, "var", shard, 2);
  }
  backend_for(p.means[0].device).merge_statistics(p);
  return s.total;
}

FoldSpecs fold_specs(const FoldParams& p) {
  FoldSpecs s;
  s.axis = check_input(p.kernel, "kernel", p.axis, 1);
  const int64_t C = p.kernel.shape[s.axis];
  BN_EXPECTS(p.mean.defined(), type_error, "mean must be an array, got None");
  BN_EXPECTS(p.var.defined(), type_error, "var must be an array, got None");
  const ChannelSource src{p.kernel, "kernel", s.axis};
  check_optional_vector(p.conv_bias, "conv_bias", src);
  check_channel_vector(p.mean, "mean", src);
  check_channel_vector(p.var, "var", src);
  check_optional_vector(p.weight, "weight", src);
  check_optional_vector(p.bias, "bias", src);
  check_eps(p.eps);
  check_cuda_usable(p.kernel, "kernel");
  s.kernel_out = like_spec(p.kernel, "kernel");
  s.bias_out = vector_spec(C, p.kernel.dtype, p.kernel.device);
  return s;
}

void fold(const FoldParams& p, const FoldSpecs& s) {
  const Named own[] = {{p.kernel, "kernel"}};
  check_against(p.kernel_out, "kernel_out", s.kernel_out, own, 1);
  // Never a per-channel vector, not even exactly (a 1-D kernel has their shape and strides):
  // on CUDA other threads read var[c] and weight[c] for every element, and mean[c] and bias[c]
  // for bias_out, while kernel_out[c] is written.
  const Named per_channel[] = {{p.conv_bias, "conv_bias"}, {p.mean, "mean"}, {p.var, "var"},
                               {p.weight, "weight"},       {p.bias, "bias"}};
  check_disjoint(p.kernel_out, "kernel_out", per_channel, 5);
  check_against(p.bias_out, "bias_out", s.bias_out);
  // bias_out[c] is written after conv_bias[c], mean[c] and bias[c] are read, by the same
  // thread: it may be exactly one of those (folding in place); var and weight are read for
  // every element of the kernel, by other threads.
  const Named vectors[] = {{p.bias_out, "bias_out"}};
  const Named read_by_all[] = {{p.kernel, "kernel"}, {p.var, "var"}, {p.weight, "weight"},
                               {p.kernel_out, "kernel_out"}};
  const Named read_by_one[] = {{p.conv_bias, "conv_bias"}, {p.mean, "mean"}, {p.bias, "bias"}};
  check_apart(vectors, 1, read_by_all, 4);
  check_in_place_or_disjoint(p.bias_out, "bias_out", read_by_one, 3);
  const TensorView* arrays[] = {&p.kernel, &p.kernel_out};
  route(&Backend::fold, p, p.kernel, make_layout(s.axis, arrays, 2));
}

CudaInfo cuda_info() {
  const Backend* cuda = cuda_backend();
  return cuda ? cuda->info() : cpu_backend().info();
}

}  // namespace batchnorm
