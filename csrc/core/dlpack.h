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

// Bytes per element of a DLPack dtype (lanes included, sub-byte types rounded up).
inline uint64_t dl_itemsize(const DLDataType& dt) { return (uint64_t{dt.bits} * dt.lanes + 7) / 8; }

// Whether some stride of `t` reaches past any address space: a dim's extent |stride| x
// (size - 1) x itemsize, or their sum, beyond 2^57 bytes. No array in memory has such strides;
// a producer's bug does (CuPy up to at least 14.2 exports a negative stride of -s bytes as
// (2^64 - s) / itemsize: cupy/cupy#10172). view_of_dltensor refuses them (ValueError).
bool strides_beyond_memory(const DLTensor& t);

// kDLCPU / kDLCUDAHost -> cpu, kDLCUDA / kDLCUDAManaged -> cuda:id, anything else a TypeError.
Device device_of_dlpack(int32_t device_type, int32_t device_id, const char* arg);

}  // namespace batchnorm
