// TensorView: the plain struct every array becomes at the boundary (data, dtype, shape,
// strides in elements, device). Kernels never see a Python object or a DLPack capsule.
#pragma once
#include <cstdint>
#include <string>

#include "core/dtype.h"
#include "core/errors.h"

namespace batchnorm {

constexpr int kMaxDims = 16;

enum class DeviceKind : int { cpu = 0, cuda = 1 };

struct Device {
  DeviceKind kind = DeviceKind::cpu;
  int index = 0;
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

std::string device_name(const Device& d);

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::float32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements; may be zero or negative
  Device device{};
  bool read_only = false;

  bool defined() const { return ndim > 0 || data != nullptr; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  template <class T>
  T* ptr() const { return static_cast<T*>(data); }
};

// An array of `ndim` dimensions fits a TensorView.
inline void check_rank_limit(int64_t ndim, const char* arg) {
  BN_EXPECTS(ndim <= kMaxDims, value_error, arg, " must have at most ", kMaxDims, " dimensions, got ", ndim);
}

// "(32, 64, 7, 7)"
std::string shape_string(const TensorView& t);

// A 1-D view over `n` contiguous elements: for outputs the op layer allocates itself.
inline TensorView vector_view(void* data, DType dtype, int64_t n, Device dev) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.ndim = 1;
  v.shape[0] = n;
  v.strides[0] = 1;
  v.device = dev;
  return v;
}

}  // namespace batchnorm
