// DLTensor -> TensorView (see dlpack.h).
#include "core/dlpack.h"

#include <string>

#include "core/errors.h"

namespace batchnorm {

namespace {
const char* dl_code_name(uint8_t code) {
  switch (code) {
    case kDLInt: return "int";
    case kDLUInt: return "uint";
    case kDLFloat: return "float";
    case kDLOpaqueHandle: return "opaque handle";
    case kDLBfloat: return "bfloat";
    case kDLComplex: return "complex";
    case kDLBool: return "bool";
    default: return "unknown";
  }
}
}  // namespace

// core/dtype.h's table holds the DLPack codes as numbers (the kernels include it without the
// public header): they must be the header's.
static_assert(find_dtype(kDLFloat, 32) == &dtype_info(DType::float32) &&
              find_dtype(kDLBfloat, 16) == &dtype_info(DType::bfloat16));

bool strides_beyond_memory(const DLTensor& t) {
  if (!t.strides || !t.shape) return false;
  constexpr uint64_t kLimit = uint64_t{1} << 57;
  const uint64_t es = dl_itemsize(t.dtype);
  uint64_t span = 0;
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] <= 1) continue;
    const int64_t s = t.strides[i];
    const uint64_t mag = s < 0 ? uint64_t{0} - static_cast<uint64_t>(s) : static_cast<uint64_t>(s);
    const uint64_t steps = static_cast<uint64_t>(t.shape[i] - 1);
    if (es != 0 && mag > kLimit / es / steps) return true;  // the extent alone is past the limit
    span += mag * es * steps;
    if (span > kLimit) return true;
  }
  return false;
}

Device device_of_dlpack(int32_t device_type, int32_t device_id, const char* arg) {
  switch (device_type) {
    case kDLCPU:
    case kDLCUDAHost: return Device{DeviceKind::cpu, 0};
    case kDLCUDA:
    case kDLCUDAManaged: return Device{DeviceKind::cuda, device_id};
    default:
      throw type_error(detail::concat(arg, " must be on the CPU or a CUDA device, got DLPack device type ",
                                      device_type));
  }
}

TensorView view_of_dltensor(const DLTensor& t, const char* arg) {
  TensorView v;
  const DLDataType dt = t.dtype;
  const DTypeInfo* row = dt.lanes == 1 ? find_dtype(dt.code, dt.bits) : nullptr;
  // The name only for the message: formatting it on every import cost 1 us an array.
  if (!row)
    unsupported_dtype(arg, detail::concat(dl_code_name(dt.code), int(dt.bits), dt.lanes != 1 ? "x" : "",
                                          dt.lanes != 1 ? std::to_string(dt.lanes) : std::string()));
  v.dtype = row->dtype;
  BN_EXPECTS(t.ndim >= 0 && t.ndim <= kMaxDims, value_error, arg, " must have at most ", kMaxDims,
             " dimensions, got ", t.ndim);
  BN_EXPECTS(t.ndim == 0 || t.shape != nullptr, value_error, arg, " must have a shape, got a NULL shape with ",
             t.ndim, " dimensions");
  v.ndim = t.ndim;
  for (int i = 0; i < v.ndim; ++i) v.shape[i] = t.shape[i];
  for (int i = 0; i < v.ndim; ++i)
    BN_EXPECTS(v.shape[i] >= 0, value_error, arg, " must have non-negative dimensions, got shape ", shape_string(v));
  // Its element count (and every offset the kernels take within it) must fit an int64.
  bool empty = false, beyond = false;
  int64_t count = 1;
  for (int i = 0; i < v.ndim; ++i) {
    empty = empty || v.shape[i] == 0;
    beyond = beyond || __builtin_mul_overflow(count, v.shape[i], &count);
  }
  BN_EXPECTS(empty || !beyond, value_error, arg, " must have at most 2**63 - 1 elements, got shape ",
             shape_string(v));
  // (An empty array may have none: torch's and NumPy's empty arrays can come without memory.)
  BN_EXPECTS(empty || t.data != nullptr, value_error, arg, " must have data, got a NULL data pointer with shape ",
             shape_string(v));
  if (t.strides) {
    if (strides_beyond_memory(t)) {
      std::string strides;
      for (int i = 0; i < t.ndim; ++i) strides += (i ? ", " : "") + std::to_string(t.strides[i]);
      throw value_error(detail::concat(
          arg, " has strides (", strides, t.ndim == 1 ? ",)" : ")", " (elements) with shape ", shape_string(v),
          " that reach past any address space: its producer exported them wrongly through DLPack (CuPy up to "
          "14.2 so exports negative strides, cupy/cupy#10172); pass a copy with positive strides"));
    }
    for (int i = 0; i < v.ndim; ++i) v.strides[i] = t.strides[i];
  } else {
    int64_t s = 1;
    for (int i = v.ndim - 1; i >= 0; --i) {
      v.strides[i] = s;
      s *= v.shape[i];
    }
  }
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  v.device = device_of_dlpack(t.device.device_type, t.device.device_id, arg);
  return v;
}

}  // namespace batchnorm
