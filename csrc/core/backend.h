// The interface each backend implements, one function per op, called by core/ops.cpp after
// every argument has been validated: backends may assume shapes, dtypes and devices agree.
#pragma once
#include "core/layout.h"
#include <cstddef>

#include "core/ops.h"

namespace batchnorm {

// An elementwise pass the op layer composes fused ops from (same shape and dtype; the
// layout walks in0, in1 (if used), out).
enum class ElementwiseKind : int {
  copy,       // out = in0
  relu_grad,  // out = in0 where in1 > 0, else 0 (dy masked by the fused forward's output y)
  add,        // out = in0 + in1 (ghost batch norm's per-group parameter gradients summed)
};
struct ElementwiseParams {
  ElementwiseKind kind = ElementwiseKind::copy;
  TensorView in0, in1, out;
  Exec exec;
};

// The fused backward (activation relu, or a dresidual output) as two steps: `mask` makes the
// masked gradient g = relu'(y) * dy (or a copy of dy) in dresidual, else in dx; `plain` is the
// backward of g. Backends given a fused BackwardParams (only with every array walked by the
// one layout: same strides) may interleave the two, range by range; the op layer runs the
// two steps itself otherwise.
struct MaskedBackward {
  ElementwiseParams mask;
  BackwardParams plain;
};
MaskedBackward split_masked_backward(const BackwardParams& p);

#define BN_DECLARE_BACKEND(ns)                                                  \
  namespace ns {                                                                \
  void statistics(const StatisticsParams& p, const Layout& layout);             \
  void forward_training(const ForwardTrainingParams& p, const Layout& layout);  \
  void forward_inference(const ForwardInferenceParams& p, const Layout& layout); \
  void backward(const BackwardParams& p, const Layout& layout);                 \
  void backward_reduce(const BackwardReduceParams& p, const Layout& layout);    \
  void backward_elemt(const BackwardElemtParams& p, const Layout& layout);      \
  void merge_statistics(const MergeStatisticsParams& p);                        \
  void fold(const FoldParams& p, const Layout& layout);                         \
  void elementwise(const ElementwiseParams& p, const Layout& layout);           \
  }

BN_DECLARE_BACKEND(cpu)
BN_DECLARE_BACKEND(cuda)
#undef BN_DECLARE_BACKEND

namespace cuda {
// Only defined when the build has the CUDA backend (BN_WITH_CUDA); reached through its Backend.
CudaInfo info();
// Stream-ordered device memory for outputs (a cached pool, never cudaMalloc per call):
// usable by work enqueued on `stream` after this call; freed back to the pool in the order
// of `stream`.
void* allocate(int device, size_t bytes, void* stream);
void deallocate(int device, void* ptr, void* stream);
// Makes `consumer` wait for all work enqueued so far on `producer` (an event, no host sync);
// nothing when they are the same stream.
void stream_wait(int device, void* producer, void* consumer);
// Returns the device memory the pools hold but no live array uses to the driver (after the
// device has finished the work queued so far); the bytes released.
size_t release_cached();
}  // namespace cuda

// One device's backend: its ops (called with validated params only) and its memory and
// stream services. The op layer and the memory functions reach a device through this table
// alone, so no op routes by hand and only core/backends.cpp knows which backends were built.
struct Backend {
  const char* name;
  void (*statistics)(const StatisticsParams&, const Layout&);
  void (*forward_training)(const ForwardTrainingParams&, const Layout&);
  void (*forward_inference)(const ForwardInferenceParams&, const Layout&);
  void (*backward)(const BackwardParams&, const Layout&);
  void (*backward_reduce)(const BackwardReduceParams&, const Layout&);
  void (*backward_elemt)(const BackwardElemtParams&, const Layout&);
  void (*merge_statistics)(const MergeStatisticsParams&);
  void (*fold)(const FoldParams&, const Layout&);
  void (*elementwise)(const ElementwiseParams&, const Layout&);
  // Memory for outputs and scratch on the device (stream-ordered on a GPU), the unused
  // cached memory returned to the system (bytes released), and one stream waiting for another.
  void* (*allocate)(int device, size_t bytes, void* stream);
  void (*deallocate)(int device, void* ptr, void* stream);
  size_t (*release_cached)();
  void (*stream_wait)(int device, void* producer, void* consumer);
  CudaInfo (*info)();
  // Runs fn(ctx, i) for i in [0, n), independent tasks touching `work` values in all: split
  // over the CPU's threads (each task then runs its own ops on one thread), or one after the
  // other on a GPU, whose ops only enqueue work. Used by ops composed of many small ops.
  void (*for_each)(int64_t n, int64_t work, void (*fn)(void* ctx, int64_t i), void* ctx);
};

const Backend& cpu_backend();
// Null in a build without the CUDA backend.
const Backend* cuda_backend();
// The backend of `device`; type_error for a CUDA device in a build without CUDA.
const Backend& backend_for(const Device& device);

namespace cpu {
// The host memory services of the CPU backend (core/memory.cpp): 64-byte aligned blocks,
// large ones cached for reuse.
void* allocate(int device, size_t bytes, void* stream);
void deallocate(int device, void* ptr, void* stream);
size_t release_cached();
// The CPU's for_each: parallel_for over the tasks (cpu/threads.cpp).
void for_each(int64_t n, int64_t work, void (*fn)(void* ctx, int64_t i), void* ctx);
}  // namespace cpu

}  // namespace batchnorm
