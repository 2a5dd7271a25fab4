// Elementwise passes (normalize, dx) over arrays that are all dense channels-first in the same
// order (NCHW contiguous, the common case): the flat index walks memory in order, 16-byte packs
// straddling rows and channels, and each value's channel is (i / inner) % channels in 32-bit
// arithmetic. The per-channel walks of walk.cuh read a 7x7 plane as 196-byte pieces; this
// reads the tensor as one stream. Used when dense_plan() says the layout allows it.
#pragma once
#include <cstdint>

#include "core/layout.h"
#include "cuda/common.cuh"
#include "cuda/convert.cuh"

namespace batchnorm::cuda {

struct DensePlan {
  bool ok = false;
  bool packed = false;  // 16-byte packs: every array aligned and the element count a multiple
  uint32_t elements = 0;
  uint32_t inner = 1;  // values per channel per sample, adjacent in memory
  uint32_t channels = 1;
};

// Every walked array of `L` laid out as one C-order (outer, channels, inner) block, under 2^31
// elements: then element i of each array is at the same flat offset i.
inline DensePlan dense_plan(const Layout& L, const void* const* data, int nt, int pack_elems) {
  DensePlan p;
  if (L.channels_last() || L.nred > 2) return p;
  const int64_t inner = L.inner();
  const int64_t outer = L.count / inner;
  const int64_t n = L.channels * L.count;
  if (n <= 0 || n >= (int64_t(1) << 31)) return p;
  for (int t = 0; t < L.ntensors; ++t) {
    if (inner > 1 && L.strides[t][L.nred - 1] != 1) return p;
    if (L.channels > 1 && L.channel_stride[t] != inner) return p;
    if (L.nred == 2 && outer > 1 && L.strides[t][0] != L.channels * inner) return p;
  }
  p.ok = true;
  p.elements = static_cast<uint32_t>(n);
  p.inner = static_cast<uint32_t>(inner);
  p.channels = static_cast<uint32_t>(L.channels);
  p.packed = n % pack_elems == 0;
  for (int t = 0; t < nt; ++t)
    if (reinterpret_cast<uintptr_t>(data[t]) % 16 != 0) p.packed = false;
  return p;
}

// out[i] = op(channel of i, a[i], b[i]) for the plan's elements, one W-pack per thread and
// step; `b` is read only when Op::kInputs == 2. Each thread reads its values before writing
// them, so out may alias a or b.
template <class T, int W, class Op>
__global__ void __launch_bounds__(kBlock)
    dense_kernel(DensePlan plan, const T* a, const T* b, T* out, Op op) {
  using A = acc_t<T>;
  const uint32_t packs = plan.elements / W;
  const uint32_t step = gridDim.x * kBlock;
  for (uint32_t p = blockIdx.x * kBlock + threadIdx.x; p < packs; p += step) {
    const uint32_t i = p * W;
    const Pack<T, W> va = *reinterpret_cast<const Pack<T, W>*>(a + i);
    Pack<T, W> vb;
    if constexpr (Op::kInputs == 2) vb = *reinterpret_cast<const Pack<T, W>*>(b + i);
    const uint32_t q = i / plan.inner;
    uint32_t r = i - q * plan.inner;
    uint32_t c = q % plan.channels;
    Pack<T, W> o;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      if constexpr (Op::kInputs == 2)
        o.v[j] = store<T>(op(c, load(va.v[j]), load(vb.v[j])));
      else
        o.v[j] = store<T>(op(c, load(va.v[j]), A(0)));
      if (++r == plan.inner) {
        r = 0;
        c = c + 1 == plan.channels ? 0 : c + 1;
      }
    }
    *reinterpret_cast<Pack<T, W>*>(out + i) = o;
  }
}

// Blocks for a dense pass: enough for every pack once, capped (the loop strides the rest).
inline unsigned dense_grid(const DensePlan& plan, int width) {
  const int64_t packs = plan.elements / width;
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(packs, kBlock), 1, int64_t(132) * 64));
}

// Launches op over the plan with 16-byte packs when allowed, else one value per thread.
template <class T, class Op>
void launch_dense(const DensePlan& plan, const T* a, const T* b, T* out, const Op& op, cudaStream_t stream) {
  if (plan.packed) {
    constexpr int W = kVecWidth<T>;
    dense_kernel<T, W, Op><<<dense_grid(plan, W), kBlock, 0, stream>>>(plan, a, b, out, op);
  } else {
    dense_kernel<T, 1, Op><<<dense_grid(plan, 1), kBlock, 0, stream>>>(plan, a, b, out, op);
  }
  BN_CUDA_CHECK_LAUNCH("dense_kernel");
}

}  // namespace batchnorm::cuda
