// A host-only check of the CUDA walks (walk.cuh), runnable without a GPU: for random shapes,
// axes and strided / transposed / flipped / multi-array layouts, it emulates every block and
// thread of cf_walk and cl_walk and checks that each element of every array is visited exactly
// once, that the arrays' offsets name the same logical element of the right channel, and that
// packs are aligned. Built on request: `ninja batchnorm_cuda_walk_check`.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

// The walks read threadIdx.x: on the host it is this variable, set by the emulation.
uint3 threadIdx;

#include "cuda/walk.cuh"

using namespace batchnorm;
using namespace batchnorm::cuda;

namespace {

std::mt19937_64 rng(12345);
int64_t rnd(int64_t a, int64_t b) { return std::uniform_int_distribution<int64_t>(a, b)(rng); }

int failures = 0;
std::map<std::string, int> seen_paths;

#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond) && failures++ < 20) {                      \
      std::printf("FAIL line %d: ", __LINE__);             \
      std::printf(__VA_ARGS__);                            \
      std::printf("\n");                                   \
    }                                                      \
  } while (0)

// A view of `shape` over its own buffer: random dim order, gaps and flips.
TensorView random_view(const std::vector<int64_t>& shape) {
  const int nd = static_cast<int>(shape.size());
  std::vector<int> order(nd);
  for (int i = 0; i < nd; ++i) order[i] = i;
  if (rnd(0, 2) == 0) std::shuffle(order.begin(), order.end(), rng);
  TensorView t;
  t.ndim = nd;
  int64_t s = rnd(0, 3) == 0 ? rnd(1, 3) : 1;
  for (int k = nd - 1; k >= 0; --k) {
    const int d = order[k];
    t.shape[d] = shape[d];
    t.strides[d] = s;
    s *= shape[d] * (rnd(0, 4) == 0 ? 2 : 1);
  }
  for (int d = 0; d < nd; ++d)
    if (rnd(0, 5) == 0) t.strides[d] = -t.strides[d];
  return t;
}

TensorView contiguous_view(const std::vector<int64_t>& shape, const std::vector<int>& memory_order) {
  TensorView t;
  t.ndim = static_cast<int>(shape.size());
  int64_t s = 1;
  for (int k = t.ndim - 1; k >= 0; --k) {
    const int d = memory_order[k];
    t.shape[d] = shape[d];
    t.strides[d] = s;
    s *= shape[d];
  }
  return t;
}

template <int NT>
void check_layout(const std::vector<int64_t>& shape, int axis, const TensorView* views, int width, bool aligned) {
  const TensorView* arrays[NT];
  for (int t = 0; t < NT; ++t) arrays[t] = &views[t];
  const Layout L = make_layout(axis, arrays, NT);
  const int64_t C = L.channels, count = L.count;
  if (count == 0 || C == 0) return;
  const int nd = static_cast<int>(shape.size());
  int64_t total = 1;
  for (int64_t s : shape) total *= s;
  // The logical (row-major) index of every offset of every array, and each index's channel.
  std::vector<std::map<int64_t, int64_t>> logical(NT);
  std::vector<int64_t> channel(static_cast<size_t>(total));
  for (int64_t lin = 0; lin < total; ++lin) {
    int64_t r = lin;
    std::vector<int64_t> idx(nd);
    for (int d = nd - 1; d >= 0; --d) {
      idx[d] = r % shape[d];
      r /= shape[d];
    }
    channel[lin] = idx[axis];
    for (int t = 0; t < NT; ++t) {
      int64_t o = 0;
      for (int d = 0; d < nd; ++d) o += idx[d] * views[t].strides[d];
      logical[t][o] = lin;
    }
  }
  std::vector<int> visits(static_cast<size_t>(total), 0);
  auto visit = [&](int64_t c, const int64_t* off, int64_t j) {
    int64_t lin0 = -1;
    for (int t = 0; t < NT; ++t) {
      const auto it = logical[t].find(off[t] + j);
      CHECK(it != logical[t].end(), "offset %lld is not in array %d", (long long)(off[t] + j), t);
      if (it == logical[t].end()) return;
      if (t == 0) lin0 = it->second;
      else CHECK(it->second == lin0, "arrays disagree on the element");
    }
    CHECK(channel[lin0] == c, "element of channel %lld visited as channel %lld", (long long)channel[lin0],
          (long long)c);
    ++visits[lin0];
  };
  const void* data[NT];
  for (int t = 0; t < NT; ++t) data[t] = reinterpret_cast<const void*>(uintptr_t(aligned ? 4096 : 4098));
  if (L.channels_last()) {
    const int W = cl_packable(L, data, NT, width) ? width : 1;
    const ClPlan plan = cl_plan(L, W);
    seen_paths[W > 1 ? "channels-last packed" : "channels-last"]++;
    if (plan.splits > 1) seen_paths["channels-last split"]++;
    if (L.nred > 1) seen_paths["channels-last generic positions"]++;
    CHECK(plan.rows * plan.lanes <= kBlock, "block too small");
    for (int64_t w = 0; w < plan.items; ++w) {
      const int64_t s = w / plan.tiles;
      const int64_t p0 = cl_split_begin(count, plan.splits, s), p1 = cl_split_begin(count, plan.splits, s + 1);
      CHECK(p1 > p0, "empty position range");
      for (unsigned tid = 0; tid < unsigned(kBlock); ++tid) {
        threadIdx.x = tid;
        const int lane = int(tid) % plan.lanes, row = int(tid) / plan.lanes;
        const int64_t c = ((w - s * plan.tiles) * plan.lanes + lane) * W;
        if (row >= plan.rows || c >= C) continue;
        const ClGeom<NT> g(L);
        cl_walk<NT, 2>(L, g, p0, p1, row, plan.rows, [&](const int64_t (&off)[2][NT], int n) {
          for (int u = 0; u < n; ++u) {
            int64_t o[NT];
            for (int t = 0; t < NT; ++t) {
              o[t] = off[u][t] + c;
              CHECK(o[t] % W == 0, "channels-last pack not aligned");
            }
            for (int j = 0; j < W; ++j) visit(c + j, o, j);
          }
        });
      }
    }
  } else {
    const int W = cf_packable(L, data, NT, width) ? width : 1;
    const CfPlan plan = cf_plan(L, W);
    seen_paths[W > 1 ? "channels-first packed" : "channels-first"]++;
    if (plan.splits > 1) seen_paths["channels-first split"]++;
    if (L.nred > 2) seen_paths["channels-first generic rows"]++;
    CHECK(plan.chunk % W == 0, "chunk not a multiple of the pack");
    for (int64_t w = 0; w < plan.items; ++w) {
      const int64_t c = w / plan.splits;
      const int64_t b0 = (w - c * plan.splits) * plan.chunk, b1 = std::min(count, b0 + plan.chunk);
      CHECK(b1 > b0, "empty range");
      for (unsigned tid = 0; tid < unsigned(kBlock); ++tid) {
        threadIdx.x = tid;
        auto body = [&](const auto& off, int n) {
          for (int u = 0; u < n; ++u) {
            for (int t = 0; t < NT; ++t) CHECK(off[u][t] % W == 0, "channels-first pack not aligned");
            for (int j = 0; j < W; ++j) visit(c, off[u], j);
          }
        };
        const CfGeom<NT> g(L, W);
        switch (W) {
          case 1: cf_walk<NT, 1, 2>(L, g, c, b0, b1, body); break;
          case 2: cf_walk<NT, 2, 2>(L, g, c, b0, b1, body); break;
          case 4: cf_walk<NT, 4, 2>(L, g, c, b0, b1, body); break;
          default: cf_walk<NT, 8, 2>(L, g, c, b0, b1, body); break;
        }
      }
    }
  }
  for (int64_t lin = 0; lin < total; ++lin)
    CHECK(visits[lin] == 1, "element %lld visited %d times", (long long)lin, visits[lin]);
}

template <int NT>
void check_contiguous(const std::vector<int64_t>& shape, const std::vector<int>& memory_order, int axis, int width) {
  const TensorView v = contiguous_view(shape, memory_order);
  const TensorView views[3] = {v, v, v};
  check_layout<NT>(shape, axis, views, width, true);
}

}  // namespace

int main() {
  int cases = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    const int nd = static_cast<int>(rnd(2, 5));
    std::vector<int64_t> shape(nd);
    int64_t total = 1;
    for (auto& s : shape) {
      s = rnd(0, 6) == 0 ? 1 : rnd(1, 9) * (rnd(0, 3) == 0 ? 8 : 1);
      total *= s;
    }
    if (total > 40000) continue;
    const int axis = static_cast<int>(rnd(0, nd - 1));
    const int width = 1 << rnd(0, 3);
    const int nt = static_cast<int>(rnd(1, 3));
    TensorView views[3];
    for (int t = 0; t < nt; ++t) views[t] = t > 0 && rnd(0, 1) ? views[0] : random_view(shape);
    const bool aligned = rnd(0, 3) != 0;
    if (nt == 1) check_layout<1>(shape, axis, views, width, aligned);
    if (nt == 2) check_layout<2>(shape, axis, views, width, aligned);
    if (nt == 3) check_layout<3>(shape, axis, views, width, aligned);
    ++cases;
  }
  // Contiguous NCHW / NHWC / (N, C) shapes with several split items.
  check_contiguous<2>({4, 3, 40, 56}, {0, 1, 2, 3}, 1, 4);
  check_contiguous<3>({4, 3, 40, 56}, {0, 1, 2, 3}, 1, 8);
  check_contiguous<2>({4, 24, 7, 7}, {0, 1, 2, 3}, 1, 4);
  check_contiguous<3>({40, 16, 16, 24}, {0, 1, 2, 3}, 3, 8);
  check_contiguous<2>({4, 40, 10, 24}, {0, 2, 3, 1}, 1, 8);
  check_contiguous<2>({3000, 6}, {0, 1}, 1, 2);
  check_contiguous<1>({20000, 1}, {0, 1}, 1, 8);
  check_contiguous<3>({2, 3000}, {0, 1}, 1, 8);
  for (const auto& [path, n] : seen_paths) std::printf("%s: %d\n", path.c_str(), n);
  std::printf("%d random layouts, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
