// DLTensor -> TensorView (see dlpack.h).
#include "core/dlpack.h"

#include <string>

#include "core/errors.h"

namespace batchnorm {

namespace {
// A refused dtype's name for the message: a base code with its bits ("int64", "complex64"), or
// one of DLPack 1.1's narrow float codes (7-17), whose names carry their width; then the lanes.
std::string dl_dtype_name(DLDataType dt) {
  static const char* const kBase[] = {"int", "uint", "float", "opaque handle", "bfloat", "complex", "bool"};
  static const char* const kNarrow[] = {"float8_e3m4",   "float8_e4m3",       "float8_e4m3b11fnuz", "float8_e4m3fn",
                                        "float8_e4m3fnuz", "float8_e5m2",     "float8_e5m2fnuz",    "float8_e8m0fnu",
                                        "float6_e2m3fn", "float6_e3m2fn",     "float4_e2m1fn"};
  std::string name;
  if (dt.code < 7)
    name = kBase[dt.code] + std::to_string(dt.bits);
  else if (dt.code < 7 + sizeof(kNarrow) / sizeof(kNarrow[0]))
    name = kNarrow[dt.code - 7];
  else
    name = "unknown DLPack type code " + std::to_string(dt.code) + " of " + std::to_string(dt.bits) + " bits";
  if (dt.lanes != 1) name += "x" + std::to_string(dt.lanes);
  return name;
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
  if (!row) unsupported_dtype(arg, dl_dtype_name(dt));
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
  // And its bytes, which an output shaped like it takes: a stride-0 view (torch's expand) holds
  // 2**62 float32 elements in 8 bytes, and their 2**64 bytes wrapped to a 0-byte output.
  int64_t bytes = 0;
  BN_EXPECTS(empty || !__builtin_mul_overflow(count, static_cast<int64_t>(row->size), &bytes), value_error,
             arg, " must have at most 2**63 - 1 bytes of elements, got shape ", shape_string(v), " of ",
             row->name, " (", row->size, " bytes each)");
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
