// Ghost batch norm as a loop over groups of the plain backend ops: forward_training per group
// (each group's statistics kept unrounded), merge_statistics over the groups, and one
// statistics-given forward_training on an empty slice for the running update, so the
// running statistics see exactly what plain batch norm on the whole batch would give them.
// The passes over memory are those of plain batch norm; only the per-channel work repeats.
#include "core/ghost.h"

#include <vector>

#include "core/errors.h"
#include "core/memory.h"
#include "core/route.h"

namespace batchnorm::detail {

namespace {

// Temporary memory of an op on its device, released in the op's stream order; taken from
// the host framework's allocator when the op has one (Exec::scratch, XLA's inside an FFI call).
class Scratch {
 public:
  Scratch(const Device& device, const Exec& exec, std::size_t bytes) : device_(device), stream_(exec.stream) {
    if (exec.scratch && device.kind == DeviceKind::cuda) {
      data_ = exec.scratch->allocate(exec.scratch->context, bytes);
      BN_EXPECTS(data_ != nullptr, runtime_error, "out of device memory for ", bytes, " bytes of scratch");
      owned_ = false;
    } else {
      data_ = batchnorm::allocate(device, bytes, stream_);
    }
  }
  ~Scratch() {
    if (owned_) batchnorm::deallocate(device_, data_, stream_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  // A (n,) view at element `offset` of the block, as `dtype` (offsets in 8-byte units).
  TensorView vector(int64_t offset, int64_t n, DType dtype) const {
    return vector_view(static_cast<char*>(data_) + offset * 8, dtype, n, device_);
  }

 private:
  Device device_;
  void* stream_;
  void* data_ = nullptr;
  bool owned_ = true;
};

// The forward's walk over one group's x, residual and y.
Layout group_layout(int axis, const ForwardTrainingParams& q) {
  if (q.residual.defined()) {
    const TensorView* arrays[] = {&q.x, &q.residual, &q.y};
    return make_layout(axis, arrays, 3);
  }
  const TensorView* arrays[] = {&q.x, &q.y};
  return make_layout(axis, arrays, 2);
}

}  // namespace

// Runs body(g) for every group through the device's for_each (side by side on the CPU).
template <class F>
void each_group(const Device& device, int64_t groups, int64_t work, F&& body) {
  backend_for(device).for_each(
      groups, work, [](void* ctx, int64_t g) { (*static_cast<F*>(ctx))(g); }, &body);
}

void ghost_forward_training(const ForwardTrainingParams& p, int axis) {
  const int64_t G = p.ghost_batch, groups = p.x.shape[0] / G, C = p.x.shape[axis];
  const bool running = p.running_mean.defined();
  // Per group the unrounded mean and variance ((groups, C) each), their merge, and the
  // running update's throwaway saved statistics: all in 8-byte slots.
  Scratch scratch(p.x.device, p.exec, running ? static_cast<std::size_t>((2 * groups + 4) * C) * 8 : 8);
  // Each group is plain batch norm on its slice of x (its own params: groups may run at once).
  auto group_params = [&](int64_t g) {
    ForwardTrainingParams q = p;
    q.running_mean = q.running_var = TensorView{};
    q.ghost_batch = 0;
    q.x = slice0(p.x, g * G, G);
    q.y = slice0(p.y, g * G, G);
    q.residual = slice0(p.residual, g * G, G);
    q.saved_mean = row_of(p.saved_mean, g);
    q.saved_invstd = row_of(p.saved_invstd, g);
    if (running) {
      q.moments_mean = scratch.vector(2 * g * C, C, DType::float64);
      q.moments_var = scratch.vector((2 * g + 1) * C, C, DType::float64);
    }
    return q;
  };
  const int64_t count = group_layout(axis, group_params(0)).count;
  each_group(p.x.device, groups, groups * count * C, [&](int64_t g) {
    const ForwardTrainingParams q = group_params(g);
    route(&Backend::forward_training, q, q.x, group_layout(axis, q));
  });
  if (!running) return;
  MergeStatisticsParams m;
  for (int64_t g = 0; g < groups; ++g) {
    const ForwardTrainingParams q = group_params(g);
    m.means.push_back(q.moments_mean);
    m.vars.push_back(q.moments_var);
  }
  m.counts.assign(static_cast<size_t>(groups), count);
  m.mean = scratch.vector(2 * groups * C, C, DType::float64);
  m.var = scratch.vector((2 * groups + 1) * C, C, DType::float64);
  m.exec = p.exec;
  backend_for(p.x.device).merge_statistics(m);
  // The running update: the whole batch's statistics given, over an empty slice of x.
  ForwardTrainingParams u = p;
  u.ghost_batch = 0;
  u.x = slice0(p.x, 0, 0);
  u.y = slice0(p.y, 0, 0);
  u.residual = slice0(p.residual, 0, 0);
  u.batch_mean = m.mean;
  u.batch_var = m.var;
  u.batch_count = groups * count;
  const DType acc = accumulation_dtype(p.x.dtype);
  u.saved_mean = scratch.vector((2 * groups + 2) * C, C, acc);
  u.saved_invstd = scratch.vector((2 * groups + 3) * C, C, acc);
  route(&Backend::forward_training, u, u.x, group_layout(axis, u));
}

void ghost_backward(const BackwardParams& p, int axis) {
  const int64_t G = p.ghost_batch, groups = p.x.shape[0] / G, C = p.x.shape[axis];
  const DType acc = accumulation_dtype(p.x.dtype);
  // Group 0 writes dweight and dbias; each later group's go to its own rows here and are
  // added in group order afterwards (the same sums whether the groups ran at once or not).
  Scratch scratch(p.x.device, p.exec, static_cast<std::size_t>(2 * groups * C) * 8);
  auto group_params = [&](int64_t g) {
    BackwardParams q = p;
    q.ghost_batch = 0;
    q.dy = slice0(p.dy, g * G, G);
    q.x = slice0(p.x, g * G, G);
    q.dx = slice0(p.dx, g * G, G);
    q.saved_mean = row_of(p.saved_mean, g);
    q.saved_invstd = row_of(p.saved_invstd, g);
    q.dweight = g == 0 ? p.dweight : scratch.vector(2 * g * C, C, acc);
    q.dbias = g == 0 ? p.dbias : scratch.vector((2 * g + 1) * C, C, acc);
    return q;
  };
  each_group(p.x.device, groups, 2 * p.x.numel(), [&](int64_t g) {
    const BackwardParams q = group_params(g);
    const TensorView* arrays[] = {&q.dy, &q.x, &q.dx};
    route(&Backend::backward, q, q.x, make_layout(axis, arrays, 3));
  });
  for (int64_t g = 1; g < groups; ++g) {
    const BackwardParams q = group_params(g);
    for (int k = 0; k < 2; ++k) {
      // total += this group's, as one channel of C values: (C, 1) views.
      ElementwiseParams e;
      e.kind = ElementwiseKind::add;
      e.in0 = e.out = k == 0 ? p.dweight : p.dbias;
      e.in1 = k == 0 ? q.dweight : q.dbias;
      for (TensorView* v : {&e.in0, &e.in1, &e.out}) {
        v->ndim = 2;
        v->shape[1] = 1;
        v->strides[1] = 1;
      }
      e.exec = p.exec;
      const TensorView* earrays[] = {&e.in0, &e.in1, &e.out};
      route(&Backend::elementwise, e, p.x, make_layout(1, earrays, 3));
    }
  }
}

}  // namespace batchnorm::detail
