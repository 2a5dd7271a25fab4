// CPU backward: one fused reduction per channel (sum dy, sum dy * (x - mean)), then dx from
// the shared coefficients; channel-parallel channels-first work computes dx right after the
// channel's reduction, while dy and x are still in cache.
#include "core/backend.h"
#include "cpu/params.h"
#include "cpu/plan.h"

namespace batchnorm::cpu {

void backward(const BackwardParams& p, const Layout& L) {
  dispatch_dtype(p.x.dtype, "x", [&](auto d) {
    using T = storage_t<decltype(d)::value>;
    using A = acc_t<T>;
    const Kernels<T>& k = kernels_for<T>();
    const int64_t C = L.channels;
    const Plan plan = make_plan(L, 3 * sizeof(T));
    const std::vector<A> mean = load_vector<A>(p.saved_mean, C, A(0));
    const std::vector<A> invstd = load_vector<A>(p.saved_invstd, C, A(1));
    const std::vector<A> weight = load_vector<A>(p.weight, C, A(1));
    const T* dy = p.dy.ptr<const T>();
    const T* x = p.x.ptr<const T>();
    T* dx = p.dx.ptr<T>();
    A* dweight = p.dweight.ptr<A>();
    A* dbias = p.dbias.ptr<A>();
    const A n = static_cast<A>(L.count);
    const int64_t work = 2 * L.count * C;
    const bool nt = stream_output(3 * L.count * C * static_cast<int64_t>(sizeof(T)));
    std::vector<BackwardCoefficients<A>> coef(static_cast<size_t>(C));
    auto finish = [&](int64_t c, double sum_dy, double sum_dy_xmu) {
      dbias[c] = static_cast<A>(sum_dy);
      dweight[c] = static_cast<A>(sum_dy_xmu * static_cast<double>(invstd[c]));
      coef[c] = backward_coefficients<A>(static_cast<A>(sum_dy), static_cast<A>(sum_dy_xmu), n, mean[c], invstd[c],
                                         weight[c]);
    };
    const int64_t cs_dy = L.channel_stride[0], cs_x = L.channel_stride[1], cs_dx = L.channel_stride[2];

    if (plan.channels_last) {
      std::vector<double> partial(static_cast<size_t>(2 * plan.groups * C));
      parallel_for(plan.groups, work, [&](int64_t g) {
        std::vector<A> scratch(static_cast<size_t>(3 * C));
        const auto [b, e] = plan.range(g);
        double* s = partial.data() + 2 * g * C;
        k.cl_grad_sums(dy, x, L, b, e, mean.data(), s, s + C, scratch.data());
      });
      for (int64_t c = 0; c < C; ++c) {
        double s1 = 0, s2 = 0;
        for (int64_t g = 0; g < plan.groups; ++g) {
          s1 += partial[2 * g * C + c];
          s2 += partial[2 * g * C + C + c];
        }
        finish(c, s1, s2);
      }
      std::vector<A> cmean(C), cscale(C), cmdy(C), cproj(C);
      for (int64_t c = 0; c < C; ++c) {
        cmean[c] = coef[c].mean;
        cscale[c] = coef[c].scale;
        cmdy[c] = coef[c].mean_dy;
        cproj[c] = coef[c].proj;
      }
      parallel_for(plan.groups, work, [&](int64_t g) {
        const auto [b, e] = plan.range(g);
        k.cl_grad_apply(dy, x, dx, L, b, e, cmean.data(), cscale.data(), cmdy.data(), cproj.data(), nt);
      });
      return;
    }

    // Channels-first: sums of group g of channel c, its pieces added in order.
    auto group_sums = [&](int64_t c, int64_t g, double& s1, double& s2) {
      const auto [b, e] = plan.range(g);
      s1 = s2 = 0;
      for (int64_t s = b; s < e; s += kPiece) {
        double a1, a2;
        k.grad_sums(dy + c * cs_dy, x + c * cs_x, L, s, std::min(e, s + kPiece), mean[c], &a1, &a2);
        s1 += a1;
        s2 += a2;
      }
    };
    if (plan.channel_parallel) {
      // Blocks of channels, walked piece by piece with the block's channels back to back;
      // the sums keep group_sums' order (pieces in order within a group, groups in order).
      parallel_for(plan.channel_blocks(C), work, [&](int64_t blk) {
        const int64_t c0 = blk * plan.channel_block, c1 = std::min(C, c0 + plan.channel_block);
        const int64_t n = c1 - c0;
        std::vector<double> t1(n, 0.0), t2(n, 0.0), g1(n), g2(n);
        for (int64_t g = 0; g < plan.groups; ++g) {
          const auto [b, e] = plan.range(g);
          std::fill(g1.begin(), g1.end(), 0.0);
          std::fill(g2.begin(), g2.end(), 0.0);
          for (int64_t s = b; s < e; s += kPiece)
            for (int64_t i = 0; i < n; ++i) {
              const int64_t c = c0 + i;
              double a1, a2;
              k.grad_sums(dy + c * cs_dy, x + c * cs_x, L, s, std::min(e, s + kPiece), mean[c], &a1, &a2);
              g1[i] += a1;
              g2[i] += a2;
            }
          for (int64_t i = 0; i < n; ++i) {
            t1[i] += g1[i];
            t2[i] += g2[i];
          }
        }
        for (int64_t i = 0; i < n; ++i) finish(c0 + i, t1[i], t2[i]);
        for_block_pieces(plan, c0, c1, [&](int64_t c, int64_t b, int64_t e) {
          k.grad_apply(dy + c * cs_dy, x + c * cs_x, dx + c * cs_dx, L, b, e, coef[c], nt);
        });
      });
      return;
    }
    std::vector<double> partial(static_cast<size_t>(2 * plan.groups * C));
    parallel_for(C * plan.groups, work, [&](int64_t i) {
      group_sums(i / plan.groups, i % plan.groups, partial[2 * i], partial[2 * i + 1]);
    });
    for (int64_t c = 0; c < C; ++c) {
      double s1 = 0, s2 = 0;
      for (int64_t g = 0; g < plan.groups; ++g) {
        s1 += partial[2 * (c * plan.groups + g)];
        s2 += partial[2 * (c * plan.groups + g) + 1];
      }
      finish(c, s1, s2);
    }
    parallel_for(C * plan.groups, work, [&](int64_t i) {
      const int64_t c = i / plan.groups, g = i % plan.groups;
      const auto [b, e] = plan.range(g);
      k.grad_apply(dy + c * cs_dy, x + c * cs_x, dx + c * cs_dx, L, b, e, coef[c], nt);
    });
  });
}

}  // namespace batchnorm::cpu
