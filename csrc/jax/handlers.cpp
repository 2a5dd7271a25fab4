// XLA FFI handlers of batchnorm._jax: statistics, merge, forward training, forward inference
// and backward, for the CPU and (with the CUDA backend) CUDA. Each only turns XLA's buffers
// into TensorViews and calls core/ops.h; the core validates and runs the kernels. The fused
// op's arrays are optional trailing buffers: the forwards' residual, the backward's y (the
// ReLU's mask) and its dresidual result; the `activation` attribute is the core's code.
//
// Batching (vmap): jax calls every target with vmap_method="broadcast_all", so an input holds
// the unbatched array behind extra leading dimensions (the `rank` attribute is the unbatched
// rank of x); each leading index is its own batch norm, run by its own core call, never folded
// into the statistics.
#include "jax/handlers.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <optional>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "core/errors.h"
#include "core/ops.h"
#include "cpu/threads.h"
#include "xla/ffi/api/ffi.h"

#if defined(BN_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace ffi = xla::ffi;

namespace batchnorm::jax {
namespace {

using Out = ffi::Result<ffi::AnyBuffer>;

// Where a call runs: the device of its buffers and the core's execution settings.
struct Target {
  Device device;
  Exec exec;
};

// XLA's element type of each row of core/dtype.h's table, in its order.
constexpr ffi::DataType kXlaTypes[] = {ffi::DataType::F16, ffi::DataType::BF16, ffi::DataType::F32,
                                       ffi::DataType::F64};
static_assert(sizeof(kXlaTypes) / sizeof(kXlaTypes[0]) == kNumDTypes);
static_assert([] {
  for (int i = 0; i < kNumDTypes; ++i)
    if (ffi::ByteWidth(kXlaTypes[i]) != kDTypes[i].size) return false;
  return kXlaTypes[static_cast<int>(DType::bfloat16)] == ffi::DataType::BF16;
}());

DType dtype_of(ffi::DataType t) {
  for (int i = 0; i < kNumDTypes; ++i)
    if (kXlaTypes[i] == t) return kDTypes[i].dtype;
  // The Python side checks dtypes while tracing; reaching this is a caller bypassing it.
  throw type_error(detail::concat("batchnorm FFI: unsupported XLA dtype code ", static_cast<int>(t)));
}

// One batch element of an XLA buffer (dense, row major): the dimensions after the `lead`
// vmap dimensions, starting at element index * (their product).
TensorView slice(void* data, ffi::DataType type, ffi::AnyBuffer::Dimensions dims, size_t lead, int64_t index,
                 const Device& device) {
  TensorView v;
  v.dtype = dtype_of(type);
  v.device = device;
  v.ndim = static_cast<int>(dims.size() - lead);
  BN_EXPECTS(v.ndim >= 1 && v.ndim <= kMaxDims, value_error, "batchnorm FFI: a buffer of rank ", dims.size(),
             " cannot hold ", lead, " batch dimensions");
  int64_t step = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.shape[d] = dims[lead + d];
    v.strides[d] = step;
    step *= v.shape[d];
  }
  v.data = static_cast<char*>(data) + index * step * static_cast<int64_t>(dtype_size(v.dtype));
  return v;
}
TensorView slice(const ffi::AnyBuffer& b, size_t lead, int64_t i, const Device& dev) {
  return slice(b.untyped_data(), b.element_type(), b.dimensions(), lead, i, dev);
}
TensorView slice(Out& b, size_t lead, int64_t i, const Device& dev) {
  return slice(b->untyped_data(), b->element_type(), b->dimensions(), lead, i, dev);
}
// An optional buffer: absent is "not given" (TensorView{}).
TensorView slice(const std::optional<ffi::AnyBuffer>& b, size_t lead, int64_t i, const Device& dev) {
  return b ? slice(*b, lead, i, dev) : TensorView{};
}
TensorView slice(std::optional<Out>& b, size_t lead, int64_t i, const Device& dev) {
  return b ? slice(*b, lead, i, dev) : TensorView{};
}

// The number of vmap dimensions in front of an array whose unbatched rank is `rank`, and the
// number of batch elements they hold.
struct Batch {
  size_t lead = 0;
  int64_t size = 1;
};
Batch batch_of(const ffi::AnyBuffer& x, int64_t rank) {
  const auto dims = x.dimensions();
  BN_EXPECTS(rank >= 1 && static_cast<int64_t>(dims.size()) >= rank, value_error, "batchnorm FFI: x has rank ",
             dims.size(), ", expected at least ", rank);
  Batch b;
  b.lead = dims.size() - static_cast<size_t>(rank);
  for (size_t d = 0; d < b.lead; ++d) b.size *= dims[d];
  return b;
}

// Zero-fills a (C,) buffer in the order of the call's work.
void zero(const TensorView& v, const Target& t) {
  const size_t bytes = static_cast<size_t>(v.numel()) * dtype_size(v.dtype);
#if defined(BN_WITH_CUDA)
  if (t.device.kind == DeviceKind::cuda) {
    const cudaError_t err = cudaMemsetAsync(v.data, 0, bytes, static_cast<cudaStream_t>(t.exec.stream));
    BN_EXPECTS(err == cudaSuccess, runtime_error, "cudaMemsetAsync failed: ", cudaGetErrorString(err));
    return;
  }
#endif
  std::memset(v.data, 0, bytes);
}

// XLA's CPU buffers come from malloc, which maps a large one afresh on 4 KB pages: the kernel's
// first writes fault it in page by page (a 102 MB inference output: 25k faults and most of a
// 45 ms call). The eager API's outputs are madvised onto transparent huge pages
// (core/memory.cpp); a large XLA output gets the same hint before the kernels write it (its
// 2 MB-aligned interior; a hint only: pages already there stay as they are).
void huge_pages(Out& b, const Target& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = b->size_bytes();
  if (t.device.kind != DeviceKind::cpu || bytes < 4 * kHuge) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(b->untyped_data());
  const uintptr_t lo = (start + kHuge - 1) / kHuge * kHuge, hi = (start + bytes) / kHuge * kHuge;
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)b;
  (void)t;
#endif
}

// Core exceptions become FFI errors (XLA raises them in Python as a runtime error).
template <class F>
ffi::Error guarded(F&& body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const value_error& e) {
    return ffi::Error::InvalidArgument(e.what());
  } catch (const type_error& e) {
    return ffi::Error::InvalidArgument(e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(e.what());
  }
}

// ---- the ops -------------------------------------------------------------------------------

ffi::Error statistics_impl(const Target& t, ffi::AnyBuffer x, int64_t rank, int64_t axis, Out mean, Out var) {
  return guarded([&] {
    const Batch b = batch_of(x, rank);
    for (int64_t i = 0; i < b.size; ++i) {
      StatisticsParams p;
      p.x = slice(x, b.lead, i, t.device);
      p.axis = static_cast<int>(axis);
      p.mean = slice(mean, b.lead, i, t.device);
      p.var = slice(var, b.lead, i, t.device);
      p.exec = t.exec;
      statistics(p);
    }
  });
}

// means / vars: (..., k, C), one row per shard; counts: the k shards' value counts.
ffi::Error merge_impl(const Target& t, ffi::AnyBuffer means, ffi::AnyBuffer vars, ffi::Span<const int64_t> counts,
                      Out mean, Out var) {
  return guarded([&] {
    const Batch b = batch_of(means, 2);
    const int64_t k = means.dimensions()[b.lead];
    BN_EXPECTS(static_cast<int64_t>(counts.size()) == k, value_error, "batchnorm FFI: ", counts.size(),
               " counts for ", k, " shards");
    for (int64_t i = 0; i < b.size; ++i) {
      const TensorView all_means = slice(means, b.lead, i, t.device), all_vars = slice(vars, b.lead, i, t.device);
      MergeStatisticsParams p;
      for (int64_t s = 0; s < k; ++s) {
        p.means.push_back(slice(all_means.data, means.element_type(), means.dimensions(), b.lead + 1, s, t.device));
        p.vars.push_back(slice(all_vars.data, vars.element_type(), vars.dimensions(), b.lead + 1, s, t.device));
        p.counts.push_back(counts[s]);
      }
      p.mean = slice(mean, b.lead, i, t.device);
      p.var = slice(var, b.lead, i, t.device);
      p.exec = t.exec;
      merge_statistics(p);
    }
  });
}

// Copies a (C,) buffer into another of the same dtype and size, in the order of the call's work.
void copy(const TensorView& to, const TensorView& from, const Target& t) {
  const size_t bytes = static_cast<size_t>(to.numel()) * dtype_size(to.dtype);
#if defined(BN_WITH_CUDA)
  if (t.device.kind == DeviceKind::cuda) {
    const cudaError_t err = cudaMemcpyAsync(to.data, from.data, bytes, cudaMemcpyDeviceToDevice,
                                            static_cast<cudaStream_t>(t.exec.stream));
    BN_EXPECTS(err == cudaSuccess, runtime_error, "cudaMemcpyAsync failed: ", cudaGetErrorString(err));
    return;
  }
#endif
  std::memcpy(to.data, from.data, bytes);
}

// The core's fused training pass, which reports the batch statistics only through the running
// statistics it updates: with momentum 1 and zeroed running statistics, that update
// (1 - 1) * 0 + 1 * s is exactly the batch mean and the batch variance, unbiased or (unbiased
// == 0) biased, rounded once (the whole batch's with ghost_batch, whose saved statistics are
// per group). The running statistics
// proper are updated by the caller (python/batchnorm/jax/functional.py), with its convention.
// Batch renorm (renorm != 0) takes r and d from the caller's running statistics as they are
// before the update: they are copied into the two results first, where the momentum-1 update
// then leaves 0 * running + s, the same batch statistics for finite running statistics.
// r and d are the optional results, given with renorm.
ffi::Error forward_training_impl(const Target& t, ffi::AnyBuffer x, ffi::AnyBuffer weight, ffi::AnyBuffer bias,
                                 ffi::AnyBuffer running_mean_in, ffi::AnyBuffer running_var_in,
                                 std::optional<ffi::AnyBuffer> residual, int64_t rank, int64_t axis, double eps,
                                 int64_t activation, int64_t unbiased, int64_t renorm, double rmax, double dmax,
                                 int64_t ghost_batch, Out y, Out saved_mean, Out saved_invstd, Out batch_var,
                                 Out batch_mean,
                                 std::optional<Out> renorm_r, std::optional<Out> renorm_d) {
  return guarded([&] {
    huge_pages(y, t);
    const Batch b = batch_of(x, rank);
    for (int64_t i = 0; i < b.size; ++i) {
      ForwardTrainingParams p;
      p.x = slice(x, b.lead, i, t.device);
      p.weight = slice(weight, b.lead, i, t.device);
      p.bias = slice(bias, b.lead, i, t.device);
      p.running_mean = slice(batch_mean, b.lead, i, t.device);
      p.running_var = slice(batch_var, b.lead, i, t.device);
      p.running_var_unbiased = unbiased != 0;
      if (renorm) {
        copy(p.running_mean, slice(running_mean_in, b.lead, i, t.device), t);
        copy(p.running_var, slice(running_var_in, b.lead, i, t.device), t);
      } else {
        zero(p.running_mean, t);
        zero(p.running_var, t);
      }
      p.momentum = 1.0;
      p.eps = eps;
      p.axis = static_cast<int>(axis);
      p.y = slice(y, b.lead, i, t.device);
      p.saved_mean = slice(saved_mean, b.lead, i, t.device);
      p.saved_invstd = slice(saved_invstd, b.lead, i, t.device);
      p.residual = slice(residual, b.lead, i, t.device);
      p.activation = static_cast<Activation>(activation);
      p.renorm = renorm != 0;
      p.renorm_rmax = rmax;
      p.renorm_dmax = dmax;
      p.renorm_r = slice(renorm_r, b.lead, i, t.device);
      p.renorm_d = slice(renorm_d, b.lead, i, t.device);
      p.ghost_batch = ghost_batch;
      p.exec = t.exec;
      forward_training(p);
    }
  });
}

ffi::Error forward_inference_impl(const Target& t, ffi::AnyBuffer x, ffi::AnyBuffer mean, ffi::AnyBuffer var,
                                  ffi::AnyBuffer weight, ffi::AnyBuffer bias, std::optional<ffi::AnyBuffer> residual,
                                  int64_t rank, int64_t axis, double eps, int64_t activation, Out y) {
  return guarded([&] {
    huge_pages(y, t);
    const Batch b = batch_of(x, rank);
    for (int64_t i = 0; i < b.size; ++i) {
      ForwardInferenceParams p;
      p.x = slice(x, b.lead, i, t.device);
      p.mean = slice(mean, b.lead, i, t.device);
      p.var = slice(var, b.lead, i, t.device);
      p.weight = slice(weight, b.lead, i, t.device);
      p.bias = slice(bias, b.lead, i, t.device);
      p.eps = eps;
      p.axis = static_cast<int>(axis);
      p.y = slice(y, b.lead, i, t.device);
      p.residual = slice(residual, b.lead, i, t.device);
      p.activation = static_cast<Activation>(activation);
      p.exec = t.exec;
      forward_inference(p);
    }
  });
}

// The optional arguments, in this order when given: y (the fused forward's output, with
// activation relu: the ReLU's mask), then r and d (renorm != 0: the batch-renorm forward's, as
// constants). XLA decodes optional arguments by position alone, so the attributes say which
// the given ones are. dresidual is asked for when the forward had a residual; ghost_batch > 0:
// saved_mean / saved_invstd are the ghost forward's (N / ghost_batch, C) statistics.
ffi::Error backward_impl(const Target& t, ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::AnyBuffer saved_mean,
                         ffi::AnyBuffer saved_invstd, ffi::AnyBuffer weight, std::optional<ffi::AnyBuffer> opt0,
                         std::optional<ffi::AnyBuffer> opt1, std::optional<ffi::AnyBuffer> opt2, int64_t rank,
                         int64_t axis, int64_t activation, int64_t renorm, int64_t ghost_batch, Out dx, Out dweight,
                         Out dbias, std::optional<Out> dresidual) {
  return guarded([&] {
    std::optional<ffi::AnyBuffer>* given[] = {&opt0, &opt1, &opt2};
    size_t next = 0;
    const std::optional<ffi::AnyBuffer> none;
    const std::optional<ffi::AnyBuffer>& y = activation != 0 ? *given[next++] : none;
    const std::optional<ffi::AnyBuffer>& r = renorm ? *given[next++] : none;
    const std::optional<ffi::AnyBuffer>& d = renorm ? *given[next++] : none;
    BN_EXPECTS((!renorm || (r && d)) && (activation == 0 || y) && (next == 3 || !*given[next]), value_error,
               "batchnorm FFI: the backward's optional arguments do not match its activation and renorm attributes");
    huge_pages(dx, t);
    if (dresidual) huge_pages(*dresidual, t);
    const Batch b = batch_of(x, rank);
    for (int64_t i = 0; i < b.size; ++i) {
      BackwardParams p;
      p.dy = slice(dy, b.lead, i, t.device);
      p.x = slice(x, b.lead, i, t.device);
      p.saved_mean = slice(saved_mean, b.lead, i, t.device);
      p.saved_invstd = slice(saved_invstd, b.lead, i, t.device);
      p.weight = slice(weight, b.lead, i, t.device);
      p.axis = static_cast<int>(axis);
      p.dx = slice(dx, b.lead, i, t.device);
      p.dweight = slice(dweight, b.lead, i, t.device);
      p.dbias = slice(dbias, b.lead, i, t.device);
      p.y = slice(y, b.lead, i, t.device);
      p.activation = static_cast<Activation>(activation);
      p.dresidual = slice(dresidual, b.lead, i, t.device);
      p.renorm_r = slice(r, b.lead, i, t.device);
      p.renorm_d = slice(d, b.lead, i, t.device);
      p.ghost_batch = ghost_batch;
      p.exec = t.exec;
      backward(p);
    }
  });
}

// ---- one entry point per op and platform ----------------------------------------------------

template <auto Impl>
struct Platforms;

template <class... A, ffi::Error (*Impl)(const Target&, A...)>
struct Platforms<Impl> {
  // The kernels' parallel loops run on XLA's intra-op pool, the threads XLA computes on, not
  // on an OpenMP team of their own (cpu/threads.h, TaskPool).
  static ffi::Error cpu(ffi::ThreadPool pool, A... args) {
    cpu::TaskPool tasks;
    tasks.ctx = &pool;
    tasks.threads = static_cast<int>(std::clamp<int64_t>(pool.num_threads(), 1, 1 << 16));
    tasks.schedule = [](void* ctx, void (*task)(void*), void* arg) {
      static_cast<ffi::ThreadPool*>(ctx)->Schedule([task, arg] { task(arg); });
    };
    const cpu::PoolScope on_xla(&tasks);
    return Impl(Target{}, std::move(args)...);
  }
#if defined(BN_WITH_CUDA)
  // Scratch comes from XLA's allocator (freed by XLA after the call, in stream order). XLA
  // refuses alignments above 16 (ffi_api.cc's kMaxAlignment: every request failed on an H200
  // when this asked for 256), so each block is asked with 16 and its start rounded up to the
  // 256 bytes that the backend's own pool gives.
  static ffi::Error cuda(cudaStream_t stream, ffi::ScratchAllocator scratch, int32_t device, A... args) {
    ScratchAllocator from_xla;
    from_xla.context = &scratch;
    from_xla.allocate = [](void* context, std::size_t bytes) -> void* {
      constexpr std::size_t kAlign = 256;
      auto block = static_cast<ffi::ScratchAllocator*>(context)->Allocate(bytes + kAlign - 16, 16);
      if (!block || *block == nullptr) return nullptr;
      const auto start = reinterpret_cast<std::uintptr_t>(*block);
      return reinterpret_cast<void*>((start + kAlign - 1) / kAlign * kAlign);
    };
    Target t;
    t.device = Device{DeviceKind::cuda, device};
    t.exec.stream = stream;
    t.exec.scratch = &from_xla;
    return Impl(t, std::move(args)...);
  }
#endif
};

}  // namespace
}  // namespace batchnorm::jax

using batchnorm::jax::Out;
using batchnorm::jax::Platforms;

// The argument lists, written once for both platforms.
#define BN_STATISTICS_ARGS(b) \
  b.Arg<ffi::AnyBuffer>().Attr<int64_t>("rank").Attr<int64_t>("axis").Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
#define BN_MERGE_ARGS(b)                                                                                \
  b.Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Attr<ffi::Span<const int64_t>>("counts").Ret<ffi::AnyBuffer>() \
      .Ret<ffi::AnyBuffer>()
#define BN_FORWARD_TRAINING_ARGS(b)                                                                        \
  b.Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<           \
       ffi::AnyBuffer>().OptionalArg<ffi::AnyBuffer>().Attr<int64_t>("rank").Attr<int64_t>("axis")           \
      .Attr<double>("eps").Attr<int64_t>("activation").Attr<int64_t>("unbiased").Attr<int64_t>("renorm")     \
      .Attr<double>("rmax").Attr<double>("dmax").Attr<int64_t>("ghost_batch").Ret<ffi::AnyBuffer>()         \
      .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()               \
      .OptionalRet<ffi::AnyBuffer>().OptionalRet<ffi::AnyBuffer>()
#define BN_FORWARD_INFERENCE_ARGS(b)                                                                      \
  b.Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<           \
       ffi::AnyBuffer>().OptionalArg<ffi::AnyBuffer>().Attr<int64_t>("rank").Attr<int64_t>("axis")           \
      .Attr<double>("eps").Attr<int64_t>("activation").Ret<ffi::AnyBuffer>()
#define BN_BACKWARD_ARGS(b)                                                                                \
  b.Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<           \
       ffi::AnyBuffer>().OptionalArg<ffi::AnyBuffer>().OptionalArg<ffi::AnyBuffer>().OptionalArg<           \
       ffi::AnyBuffer>().Attr<int64_t>("rank").Attr<int64_t>("axis").Attr<int64_t>("activation")            \
      .Attr<int64_t>("renorm").Attr<int64_t>("ghost_batch").Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()      \
      .Ret<ffi::AnyBuffer>().OptionalRet<ffi::AnyBuffer>()

#define BN_DEFINE_HANDLERS_CPU(name, impl, ARGS) \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(bn_jax_##name##_cpu, Platforms<batchnorm::jax::impl>::cpu,      \
                                ARGS(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

BN_DEFINE_HANDLERS_CPU(statistics, statistics_impl, BN_STATISTICS_ARGS)
BN_DEFINE_HANDLERS_CPU(merge, merge_impl, BN_MERGE_ARGS)
BN_DEFINE_HANDLERS_CPU(forward_training, forward_training_impl, BN_FORWARD_TRAINING_ARGS)
BN_DEFINE_HANDLERS_CPU(forward_inference, forward_inference_impl, BN_FORWARD_INFERENCE_ARGS)
BN_DEFINE_HANDLERS_CPU(backward, backward_impl, BN_BACKWARD_ARGS)

#if defined(BN_WITH_CUDA)
#define BN_CUDA_CONTEXT \
  ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::ScratchAllocator>().Ctx<ffi::DeviceOrdinal>()
#define BN_DEFINE_HANDLERS_CUDA(name, impl, ARGS) \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(bn_jax_##name##_cuda, Platforms<batchnorm::jax::impl>::cuda, ARGS(BN_CUDA_CONTEXT));

BN_DEFINE_HANDLERS_CUDA(statistics, statistics_impl, BN_STATISTICS_ARGS)
BN_DEFINE_HANDLERS_CUDA(merge, merge_impl, BN_MERGE_ARGS)
BN_DEFINE_HANDLERS_CUDA(forward_training, forward_training_impl, BN_FORWARD_TRAINING_ARGS)
BN_DEFINE_HANDLERS_CUDA(forward_inference, forward_inference_impl, BN_FORWARD_INFERENCE_ARGS)
BN_DEFINE_HANDLERS_CUDA(backward, backward_impl, BN_BACKWARD_ARGS)
#endif
