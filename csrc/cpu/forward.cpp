// CPU forward passes: training (batch statistics, normalize, running-statistics update) and
// inference (given statistics). Channels-first channel-parallel training normalizes each
// channel right after its reduction, while the channel is still in cache.
#include <cmath>

#include "core/backend.h"
#include "cpu/params.h"
#include "cpu/plan.h"

namespace batchnorm::cpu {

namespace {

// Rows at least this long are walked in memory order by the elementwise pass.
constexpr int64_t kMemoryOrderRow = 1024;

// Rows the kernels take as short rows (16-64 float or 8-32 double accumulators: a 7x7 plane
// of float32 or a half type) are also walked in memory order when the data comes from DRAM
// (`nt`): channel by channel they are a few cache lines every C rows, 2.2x slower on
// 256x2048x7x7 float32; in cache, the per-row calls of the memory-order walk cost more
// (256x512x5x5: 0.81x copy by channel blocks, 0.49x in memory order; measured, 2 threads).
template <class T>
bool short_rows(const Layout& L) {
  const int64_t bytes = L.inner() * static_cast<int64_t>(sizeof(acc_t<T>));
  return L.strides[0][L.nred - 1] == 1 && bytes >= 64 && bytes <= 256;
}

// y = (x - mean) * scale + shift over the whole array, with per-channel A vectors.
template <class T>
void normalize_all(const Kernels<T>& k, const T* x, T* y, const Layout& L, const Plan& plan, const acc_t<T>* mean,
                   const acc_t<T>* scale, const acc_t<T>* shift, bool nt) {
  const int64_t C = L.channels;
  const int64_t work = L.count * C;
  if (plan.channels_last) {
    parallel_for(plan.groups, work, [&](int64_t g) {
      const auto [b, e] = plan.range(g);
      k.cl_normalize(x, y, L, b, e, mean, scale, shift, nt);
    });
  } else if (L.nred == 2 && (L.inner() >= kMemoryOrderRow || (nt && short_rows<T>(L)))) {
    // Long rows: walk memory in order (all channels of one outer index, then the next), as a
    // copy would; the row loop restarts per (outer, channel) at no measurable cost.
    const int64_t outer = L.sizes[0];
    parallel_for(outer, work, [&](int64_t o) {
      for (int64_t c = 0; c < C; ++c)
        k.normalize(x + c * L.channel_stride[0], y + c * L.channel_stride[1], L, o * L.inner(), (o + 1) * L.inner(),
                    mean[c], scale[c], shift[c], nt);
    });
  } else if (plan.channel_parallel) {
    parallel_for(plan.channel_blocks(C), work, [&](int64_t blk) {
      const int64_t c0 = blk * plan.channel_block, c1 = std::min(C, c0 + plan.channel_block);
      for_block_pieces(plan, c0, c1, [&](int64_t c, int64_t b, int64_t e) {
        k.normalize(x + c * L.channel_stride[0], y + c * L.channel_stride[1], L, b, e, mean[c], scale[c], shift[c], nt);
      });
    });
  } else {
    parallel_for(C * plan.groups, work, [&](int64_t i) {
      const int64_t c = i / plan.groups, g = i % plan.groups;
      const auto [b, e] = plan.range(g);
      k.normalize(x + c * L.channel_stride[0], y + c * L.channel_stride[1], L, b, e, mean[c], scale[c], shift[c],
                  nt);
    });
  }
}

}  // namespace

void forward_training(const ForwardTrainingParams& p, const Layout& L) {
  dispatch_dtype(p.x.dtype, "x", [&](auto d) {
    using T = storage_t<decltype(d)::value>;
    using A = acc_t<T>;
    const Kernels<T>& k = kernels_for<T>();
    const int64_t C = L.channels;
    const Plan plan = make_plan(L, 2 * sizeof(T));
    const std::vector<A> weight = load_vector<A>(p.weight, C, A(1));
    const std::vector<A> bias = load_vector<A>(p.bias, C, A(0));
    std::vector<double> batch_var(static_cast<size_t>(C));
    std::vector<A> scale(static_cast<size_t>(C));
    A* mean = p.saved_mean.ptr<A>();
    A* invstd = p.saved_invstd.ptr<A>();
    const T* x = p.x.ptr<const T>();
    T* y = p.y.ptr<T>();
    const bool nt = stream_output(2 * L.count * C * static_cast<int64_t>(sizeof(T)));
    // Channel c's batch mean and biased variance, in double, from x or as given.
    auto per_channel = [&](int64_t c, double m, double v) {
      batch_var[c] = v;
      mean[c] = static_cast<A>(m);
      invstd[c] = static_cast<A>(1.0 / std::sqrt(batch_var[c] + p.eps));
      scale[c] = invstd[c] * weight[c];
    };
    bool fused = false;
    if (p.batch_mean.defined()) {
      const std::vector<double> gm = load_vector<double>(p.batch_mean, C, 0.0);
      const std::vector<double> gv = load_vector<double>(p.batch_var, C, 0.0);
      for (int64_t c = 0; c < C; ++c) per_channel(c, gm[c], gv[c]);
    } else {
      fused = all_moments(
          k, x, L, plan, [&](int64_t c, const Moments<double>& m) { per_channel(c, m.mean, m.m2 / m.n); },
          [&](int64_t c0, int64_t c1) {
            for_block_pieces(plan, c0, c1, [&](int64_t c, int64_t b, int64_t e) {
              k.normalize(x + c * L.channel_stride[0], y + c * L.channel_stride[1], L, b, e, mean[c], scale[c],
                          bias[c], nt);
            });
          });
    }
    if (!fused && L.count > 0) normalize_all(k, x, y, L, plan, mean, scale.data(), bias.data(), nt);
    if (p.running_mean.defined()) {
      const double n = static_cast<double>(p.batch_mean.defined() ? p.batch_count : L.count);
      std::vector<double> rm = load_vector<double>(p.running_mean, C, 0.0);
      std::vector<double> rv = load_vector<double>(p.running_var, C, 0.0);
      for (int64_t c = 0; c < C; ++c) {
        rm[c] = running_update<double>(rm[c], static_cast<double>(mean[c]), p.momentum);
        rv[c] = running_update<double>(rv[c], batch_var[c] * n / (n - 1.0), p.momentum);
      }
      store_vector(p.running_mean, rm.data());
      store_vector(p.running_var, rv.data());
    }
  });
}

void forward_inference(const ForwardInferenceParams& p, const Layout& L) {
  dispatch_dtype(p.x.dtype, "x", [&](auto d) {
    using T = storage_t<decltype(d)::value>;
    using A = acc_t<T>;
    const int64_t C = L.channels;
    const std::vector<double> var = load_vector<double>(p.var, C, 1.0);
    const std::vector<A> mean = load_vector<A>(p.mean, C, A(0));
    const std::vector<A> weight = load_vector<A>(p.weight, C, A(1));
    const std::vector<A> bias = load_vector<A>(p.bias, C, A(0));
    std::vector<A> scale(static_cast<size_t>(C));
    for (int64_t c = 0; c < C; ++c) scale[c] = static_cast<A>(1.0 / std::sqrt(var[c] + p.eps)) * weight[c];
    normalize_all(kernels_for<T>(), p.x.ptr<const T>(), p.y.ptr<T>(), L, make_plan(L, 2 * sizeof(T)), mean.data(), scale.data(),
                  bias.data(), stream_output(2 * L.count * C * static_cast<int64_t>(sizeof(T))));
  });
}

}  // namespace batchnorm::cpu
