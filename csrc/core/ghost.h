// Ghost batch norm (Hoffer et al. 2017) composed from the backends' plain ops: the groups of
// samples along axis 0 are each a plain batch, and the running statistics are updated once
// from their statistics merged with Chan's formula. Called by ops.cpp after validation.
#pragma once
#include "core/ops.h"

namespace batchnorm::detail {

// p.ghost_batch > 0; the arguments checked (saved_mean / saved_invstd are (N / G, C)).
void ghost_forward_training(const ForwardTrainingParams& p, int axis);
// p.ghost_batch > 0 and p plain (no activation, no dresidual): the fused part is done.
void ghost_backward(const BackwardParams& p, int axis);

}  // namespace batchnorm::detail
