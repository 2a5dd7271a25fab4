// DLPack's DLTensor as a TensorView: the one place DLPack device types become the core's (dtype
// codes through core/dtype.h's table), shared by the Python binding (capsules) and the C ABI
// (DLTensor pointers). The structs are those of the public header include/batchnorm/batchnorm.h.
#pragma once
#include <cstdint>
#include <string>

#include "batchnorm/batchnorm.h"
#include "core/tensor.h"

namespace batchnorm {

// The view of `t`: dtype (lanes 1), shape, strides (NULL: C order), data + byte_offset,
// device. Errors name `arg`: TypeError for dtypes and devices, ValueError for ranks.
// read_only stays false (DLTensor has no flags; a versioned capsule's are the caller's).
TensorView view_of_dltensor(const DLTensor& t, const char* arg);

// kDLCPU / kDLCUDAHost -> cpu, kDLCUDA / kDLCUDAManaged -> cuda:id, anything else a TypeError.
Device device_of_dlpack(int32_t device_type, int32_t device_id, const char* arg);

}  // namespace batchnorm
