// Per-channel parameter vectors (weight, bias, statistics) of any dtype and stride read
// into the accumulation type, and running statistics written back in their own dtype.
#pragma once
#include <algorithm>
#include <vector>

#include "core/tensor.h"
#include "cpu/convert.h"
#include "cpu/scratch.h"
#include "cpu/threads.h"

namespace batchnorm::cpu {

// The values [c0, c0 + n) of a (C,) view as A into `out`, or `fill` when the view is
// undefined. The dtype is dispatched once per range, not per value: with 18432 channels,
// per-value dispatch was most of a 62 us per-channel prologue (inference of (1, 18432), Xeon).
// The values are those of load_any / store_any.
template <class A>
void load_range(const TensorView& t, int64_t c0, int64_t n, A fill, A* out) {
  if (!t.defined()) {
    std::fill(out, out + n, fill);
    return;
  }
  const int64_t s = t.strides[0];
  dispatch_dtype(t.dtype, "vector", [&](auto d) {
    using S = storage_t<decltype(d)::value>;
    const S* p = static_cast<const S*>(t.data) + c0 * s;
    // Locals, not the captured references: a store through `to` may alias those, and
    // reloading them every value kept the loop scalar ((2, 65536) training, 3%).
    A* to = out;
    const int64_t m = n;
    auto value = [](S v) { return static_cast<A>(static_cast<double>(load_at(&v))); };
    if (s == 1)  // the usual case, a loop the compiler vectorizes
      for (int64_t i = 0; i < m; ++i) to[i] = value(p[i]);
    else
      for (int64_t i = 0; i < m; ++i) to[i] = value(p[i * s]);
  });
}

// Channels per block of for_channels: a block's values in stack arrays stay in L1.
constexpr int64_t kParamBlock = 512;

// Runs f(c0, c1) over blocks of kParamBlock channels covering [0, C), on every thread once
// C * work_per_channel reaches parallel_for's threshold. The ops' per-channel loops
// (parameter loads, coefficients with a square root and a division in double: about 8 units)
// ran on the calling thread alone while the others waited: (1, 65536) float32 inference
// 206 -> 101 us, (32, 18432) 144-198 -> 110 us (Xeon, 2 threads). Channels are independent
// there, so the split leaves every value's bits as they were.
template <class F>
void for_channels(int64_t C, int64_t work_per_channel, F&& f) {
  const int64_t blocks = (C + kParamBlock - 1) / kParamBlock;
  parallel_for(blocks, C * work_per_channel, [&](int64_t b) { f(b * kParamBlock, std::min(C, (b + 1) * kParamBlock)); });
}

// The values of a (C,) view as A, or `fill` repeated when the view is undefined; each block
// written once, on the thread that loads it (no serial fill first).
template <class A>
scratch_array<A> load_vector(const TensorView& t, int64_t n, A fill) {
  scratch_array<A> v(static_cast<size_t>(n));
  for_channels(n, 2, [&](int64_t c0, int64_t c1) { load_range(t, c0, c1 - c0, fill, v.data() + c0); });
  return v;
}

// values[0, n) written to [c0, c0 + n) of a (C,) view in its own dtype.
template <class A>
void store_range(const TensorView& t, int64_t c0, int64_t n, const A* values) {
  const int64_t s = t.strides[0];
  dispatch_dtype(t.dtype, "vector", [&](auto d) {
    using S = storage_t<decltype(d)::value>;
    S* p = static_cast<S*>(t.data) + c0 * s;
    const A* from = values;  // locals, as in load_range (a scalar loop: 12% of (2, 65536) training)
    const int64_t m = n;
    // (store_at rounds a double to a half type once: cpu/convert.h, store)
    if (s == 1)  // the usual case, a loop the compiler vectorizes
      for (int64_t i = 0; i < m; ++i) store_at(p + i, from[i]);
    else
      for (int64_t i = 0; i < m; ++i) store_at(p + i * s, from[i]);
  });
}

}  // namespace batchnorm::cpu
