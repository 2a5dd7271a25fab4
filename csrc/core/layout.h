// The batch-norm view of one or more same-shaped arrays walked together (x and y; dy, x
// and dx): C channels along `axis`, every other axis reduced. Reduced axes are ordered by
// the first array's strides and merged where every array allows, so a contiguous NCHW input
// becomes (outer = N, channels = C, inner = H*W) and NHWC becomes (positions = N*H*W, C)
// with channel stride 1; any other strides are walked as they are, never copied.
#pragma once
#include <cstdint>

#include "core/recipes.h"
#include "core/tensor.h"

// Member functions are implicitly inline; under nvcc they are callable on the device too.
#if defined(__CUDACC__)
#define BN_HD_MEMBER __host__ __device__
#else
#define BN_HD_MEMBER
#endif

namespace batchnorm {

constexpr int kMaxWalked = 3;

struct Layout {
  int64_t channels = 0;
  int64_t count = 0;  // values per channel (product of the reduced extents)
  int nred = 1;       // merged reduced dims, outer to inner; always >= 1 (a size-1 dim if none)
  int ntensors = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t channel_stride[kMaxWalked] = {};
  int64_t strides[kMaxWalked][kMaxDims] = {};

  // Every walked array has its channels adjacent in memory: the NHWC / (N, C) layout.
  BN_HD_MEMBER bool channels_last() const {
    for (int t = 0; t < ntensors; ++t)
      if (channel_stride[t] != 1) return false;
    return channels > 1;
  }
  BN_HD_MEMBER int64_t inner() const { return sizes[nred - 1]; }
  BN_HD_MEMBER int64_t inner_stride(int t) const { return strides[t][nred - 1]; }
  // Offset (in elements) of outer index o (over dims [0, nred-1)) of array t.
  BN_HD_MEMBER int64_t outer_offset(int t, int64_t o) const {
    int64_t off = 0;
    for (int d = nred - 2; d >= 0; --d) {
      const int64_t s = sizes[d];
      off += (o % s) * strides[t][d];
      o /= s;
    }
    return off;
  }
  // Offset of position p over all reduced dims (channels-last walking).
  BN_HD_MEMBER int64_t position_offset(int t, int64_t p) const {
    int64_t off = 0;
    for (int d = nred - 1; d >= 0; --d) {
      const int64_t s = sizes[d];
      off += (p % s) * strides[t][d];
      p /= s;
    }
    return off;
  }
};

// Normalizes `axis` (negative counts from the end) against rank `ndim`; ValueError naming
// `arg` when out of range.
int normalize_axis(int axis, int ndim, const char* arg = "axis");

// Builds the layout of `n` arrays of identical shape (checked by the caller) around `axis`.
Layout make_layout(int axis, const TensorView* const* arrays, int n);

}  // namespace batchnorm
