// Argument checks shared by every op (see validate.h).
#include "core/validate.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <string>
#include <utility>

#include "core/errors.h"
#include "core/layout.h"

namespace batchnorm::detail {

void check_float_array(const TensorView& t, const char* arg) {
  const int code = static_cast<int>(t.dtype);
  BN_EXPECTS(is_dtype_code(code), type_error, arg, " must have dtype ", kDTypeList, ", got dtype code ", code);
  BN_EXPECTS(t.ndim >= 0 && t.ndim <= kMaxDims, value_error, arg, " must have at most ", kMaxDims,
             " dimensions, got ", t.ndim);
  // The CPU kernels read any address (unaligned loads); a GPU faults on a misaligned element.
  BN_EXPECTS(t.device.kind != DeviceKind::cuda || reinterpret_cast<uintptr_t>(t.data) % dtype_size(t.dtype) == 0,
             value_error, arg, " must be aligned to its item size (", dtype_size(t.dtype),
             " bytes) on a CUDA device, got an address off by ",
             reinterpret_cast<uintptr_t>(t.data) % dtype_size(t.dtype), " bytes");
}

int check_input(const TensorView& x, const char* arg, int axis, int min_rank) {
  BN_EXPECTS(x.defined(), type_error, arg, " must be an array, got None");
  check_float_array(x, arg);
  BN_EXPECTS(x.ndim >= min_rank, value_error, arg, " must have at least ", min_rank, " dimension",
             min_rank == 1 ? "" : "s", min_rank == 2 ? " (N, C, ...)" : "", ", got ", x.ndim, " dimension",
             x.ndim == 1 ? "" : "s", " with shape ", shape_string(x));
  return normalize_axis(axis, x.ndim);
}

void check_same_device(const TensorView& a, const char* a_arg, const TensorView& b, const char* b_arg) {
  BN_EXPECTS(a.device == b.device, type_error, b_arg, " must be on the same device as ", a_arg, " (",
             device_name(a.device), "), got ", device_name(b.device));
}

void check_channel_vector(const TensorView& t, const char* arg, const ChannelSource& source) {
  check_float_array(t, arg);
  const Device& device = source.x.device;
  BN_EXPECTS(t.device == device, type_error, arg, " must be on the same device as ", source.name, " (",
             device_name(device), "), got ", device_name(t.device));
  const int64_t channels = source.channels();
  if (t.ndim == 1 && t.shape[0] == channels) return;
  const std::string context =
      source.x.ndim >= 2 ? concat(" (", source.name, " has shape ", shape_string(source.x), ": ", channels,
                                  " channels on axis ", source.axis, ")")
                         : std::string();
  throw value_error(concat(arg, " must have shape (", channels, ",), got ", shape_string(t), context));
}

namespace {
bool self_overlapping(const TensorView& t);  // (below, with the other memory tests)
}  // namespace

void check_writable(const TensorView& t, const char* arg) {
  BN_EXPECTS(!t.read_only, value_error, arg, " must be writable, got a read-only array");
  // Two positions on one element: the writes race between threads, and the last one wins (a
  // running statistic given as a broadcast view took one value, a different one each run).
  BN_EXPECTS(t.numel() == 0 || !self_overlapping(t), value_error, arg,
             " must not have overlapping elements: its strides, ordered by size, must each step past the extent of "
             "the smaller ones (a zero or broadcast stride repeats memory), got strides that do not");
}

void check_same_shape(const TensorView& a, const char* a_arg, const TensorView& b, const char* b_arg) {
  bool same = a.ndim == b.ndim;
  for (int i = 0; same && i < a.ndim; ++i) same = a.shape[i] == b.shape[i];
  BN_EXPECTS(same, value_error, b_arg, " must have the shape of ", a_arg, ", ", shape_string(a), ", got ",
             shape_string(b));
}

bool same_strides(const TensorView& a, const TensorView& b) {
  if (a.ndim != b.ndim || a.dtype != b.dtype) return false;
  for (int i = 0; i < a.ndim; ++i)
    if (a.shape[i] != b.shape[i] || (a.shape[i] > 1 && a.strides[i] != b.strides[i])) return false;
  return true;
}

namespace {
// Byte range [lo, hi) that a view touches.
void byte_span(const TensorView& t, intptr_t& lo, intptr_t& hi) {
  const intptr_t base = reinterpret_cast<intptr_t>(t.data);
  const intptr_t es = static_cast<intptr_t>(dtype_size(t.dtype));
  intptr_t a = 0, b = 0;
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] == 0) {
      lo = hi = base;
      return;
    }
    const intptr_t ext = static_cast<intptr_t>((t.shape[i] - 1) * t.strides[i]) * es;
    if (ext < 0) a += ext; else b += ext;
  }
  lo = base + a;
  hi = base + b + es;
}

// The dims of t with extent > 1, ordered by decreasing |stride|; returns how many.
int dims_by_stride(const TensorView& t, int* order) {
  int n = 0;
  for (int i = 0; i < t.ndim; ++i)
    if (t.shape[i] > 1) order[n++] = i;
  for (int i = 1; i < n; ++i)  // insertion sort by |stride|, largest first
    for (int j = i; j > 0 && std::llabs(t.strides[order[j]]) > std::llabs(t.strides[order[j - 1]]); --j)
      std::swap(order[j], order[j - 1]);
  return n;
}

// Some element of `t` is reached from two logical positions (a zero or overlapping stride):
// the dims, ordered by |stride|, must each step past the extent of the ones below.
bool self_overlapping(const TensorView& t) {
  int order[kMaxDims];
  const int n = dims_by_stride(t, order);
  int64_t extent = 1;
  for (int i = n - 1; i >= 0; --i) {
    const int64_t s = std::llabs(t.strides[order[i]]);
    if (s < extent) return true;
    extent = s * t.shape[order[i]];
  }
  return false;
}

// Whether an offset of d elements is k . strides for some |k_i| < shape_i (dims `order`,
// |stride| decreasing from `i`). The strides are nested (not self-overlapping), so what the
// smaller dims reach stays below the current stride and each digit has at most two choices.
bool reaches(const TensorView& t, const int* order, int n, int i, int64_t d) {
  if (i == n) return d == 0;
  int64_t rest = 0;
  for (int j = i + 1; j < n; ++j) rest += (t.shape[order[j]] - 1) * std::llabs(t.strides[order[j]]);
  const int64_t s = std::llabs(t.strides[order[i]]), top = t.shape[order[i]] - 1;
  auto floor_div = [](int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); };
  const int64_t lo = std::max(-top, -floor_div(rest - d, s)), hi = std::min(top, floor_div(d + rest, s));
  for (int64_t k = lo; k <= hi; ++k)
    if (reaches(t, order, n, i + 1, d - k * s)) return true;
  return false;
}

// Whether a and b share an element. Exact for two views of one dtype, shape and strides
// (interleaved views such as buf[0::2] and buf[1::2] share none); otherwise conservative:
// any overlap of the byte ranges they span counts.
bool share_memory(const TensorView& a, const TensorView& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  intptr_t alo, ahi, blo, bhi;
  byte_span(a, alo, ahi);
  byte_span(b, blo, bhi);
  if (ahi <= blo || bhi <= alo) return false;
  const intptr_t es = static_cast<intptr_t>(dtype_size(a.dtype));
  const intptr_t bytes = static_cast<char*>(b.data) - static_cast<char*>(a.data);
  if (!same_strides(a, b) || self_overlapping(a) || bytes % es != 0) return true;
  int order[kMaxDims];
  const int n = dims_by_stride(a, order);
  return reaches(a, order, n, 0, bytes / es);
}
}  // namespace

void check_output(const TensorView& out, const char* arg, const TensorView& like, const char* like_arg,
                  const Named* inputs, int ninputs) {
  check_float_array(out, arg);
  BN_EXPECTS(out.device == like.device, type_error, arg, " must be on the same device as ", like_arg, " (",
             device_name(like.device), "), got ", device_name(out.device));
  check_same_shape(like, like_arg, out, arg);
  BN_EXPECTS(out.dtype == like.dtype, type_error, arg, " must have the dtype of ", like_arg, ", ",
             dtype_name(like.dtype), ", got ", dtype_name(out.dtype));
  check_writable(out, arg);
  if (out.numel() == 0) return;
  check_in_place_or_disjoint(out, arg, inputs, ninputs);
}

void check_in_place_or_disjoint(const TensorView& written, const char* arg, const Named* others, int nothers) {
  if (!written.defined()) return;
  for (int i = 0; i < nothers; ++i) {
    const TensorView& in = others[i].view;
    if (!in.defined()) continue;
    const bool in_place = in.data == written.data && same_strides(in, written);
    BN_EXPECTS(in_place || !share_memory(written, in), value_error, arg, " must be either ", others[i].name,
               " itself (same memory and strides) or share no memory with it, got memory that partially overlaps ",
               others[i].name);
  }
}

void check_disjoint(const TensorView& written, const char* arg, const Named* others, int nothers) {
  if (!written.defined()) return;
  for (int i = 0; i < nothers; ++i) {
    const TensorView& o = others[i].view;
    if (!o.defined()) continue;
    BN_EXPECTS(!share_memory(written, o), value_error, arg, " must not share memory with ", others[i].name,
               ": it is written while ", others[i].name, " is still in use; pass separate arrays");
  }
}

void check_apart(const Named* vectors, int nvectors, const Named* others, int nothers) {
  // Each argument's byte range once (check_disjoint per pair took it again for every pair: 0.3
  // us of a small training call); the exact test only for ranges that meet.
  constexpr int kMax = 32;
  if (nvectors + nothers > kMax) {  // (no op has as many)
    for (int i = 0; i < nvectors; ++i) {
      check_disjoint(vectors[i].view, vectors[i].name, others, nothers);
      check_disjoint(vectors[i].view, vectors[i].name, vectors + i + 1, nvectors - i - 1);
    }
    return;
  }
  intptr_t lo[kMax], hi[kMax];
  const Named* all[kMax];
  int n = 0, nv = 0;
  for (int i = 0; i < nvectors + nothers; ++i) {
    const Named& a = i < nvectors ? vectors[i] : others[i - nvectors];
    if (!a.view.defined() || a.view.numel() == 0) continue;
    byte_span(a.view, lo[n], hi[n]);
    all[n++] = &a;
    nv += i < nvectors;
  }
  for (int i = 0; i < nv; ++i)
    for (int j = i + 1; j < n; ++j)
      if (lo[i] < hi[j] && lo[j] < hi[i]) check_disjoint(all[i]->view, all[i]->name, all[j], 1);
}

void check_eps(double eps) {
  BN_EXPECTS(std::isfinite(eps) && eps >= 0.0, value_error, "eps must be finite and >= 0, got ", eps);
}

void check_momentum(double momentum) {
  BN_EXPECTS(std::isfinite(momentum) && momentum >= 0.0 && momentum <= 1.0, value_error,
             "momentum must be a finite number in [0, 1], got ", momentum);
}

}  // namespace batchnorm::detail
