// The per-channel moments of x on the GPU (statistics.cu): the split reduction and the
// finalize that turns the merged moments into whatever the op needs. statistics asks for
// (mean, var); forward_training for (mean, invstd, scale, shift) and the running update.
#pragma once
#include <cuda_runtime.h>

#include "core/layout.h"
#include "core/ops.h"
#include "core/tensor.h"
#include "cuda/convert.cuh"

namespace batchnorm::cuda {

// Outputs of the finalize: (C,) contiguous arrays of the accumulation type, null when not
// wanted; the parameter vectors are read (weight, bias) or updated (running statistics).
struct MomentsOutputs {
  void* mean = nullptr;    // batch mean
  void* var = nullptr;     // biased batch variance
  void* invstd = nullptr;  // 1 / sqrt(var + eps); with it scale = invstd * weight and shift = bias
  void* scale = nullptr;
  void* shift = nullptr;
  ParamRef weight, bias, running_mean, running_var;  // running_* updated when given
  double eps = 0.0;
  double momentum = 0.0;
  bool wide = false;  // mean and var written as float64 (the moments unrounded)
  // Training variants (ForwardTrainingParams): the running update's options, batch renorm's
  // clipping (with r and d written when renorm_r is set), the moments unrounded.
  RunningOptions running;
  double rmax = 1.0, dmax = 0.0;
  void* renorm_r = nullptr;
  void* renorm_d = nullptr;
  double* mean64 = nullptr;
  double* var64 = nullptr;
};

// Enqueues the reduction of x (array 0 of `layout`) and the finalize on `stream`; the
// caller has made x's device current.
// `scratch` (may be null) is the op's Exec::scratch.
void reduce_moments(const TensorView& x, const Layout& layout, const MomentsOutputs& out, cudaStream_t stream,
                    const ScratchAllocator* scratch);

// The same outputs from given batch statistics (mean and biased var of `count` values per
// channel) instead of a reduction of x: the finalize alone, for statistics merged across
// processes. `x_dtype` fixes the accumulation type.
void given_moments(DType x_dtype, const ParamRef& mean, const ParamRef& var, int64_t channels, int64_t count,
                   const MomentsOutputs& out, cudaStream_t stream);

}  // namespace batchnorm::cuda
