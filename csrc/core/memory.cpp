// Output memory routing (see memory.h).
#include "core/memory.h"

#include <cstdlib>
#include <new>

#include "core/backend.h"
#include "core/errors.h"

namespace batchnorm {

void* allocate(const Device& device, std::size_t bytes, void* stream) {
  if (device.kind == DeviceKind::cuda) {
#if defined(BN_WITH_CUDA)
    return cuda::allocate(device.index, bytes, stream);
#else
    throw type_error("cannot allocate on " + device_name(device) + ": this build has no CUDA backend");
#endif
  }
  const std::size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded ? rounded : 64);
  BN_EXPECTS(p != nullptr, runtime_error, "out of host memory allocating ", bytes, " bytes");
  return p;
}

void deallocate(const Device& device, void* ptr, void* stream) {
  if (!ptr) return;
  if (device.kind == DeviceKind::cuda) {
#if defined(BN_WITH_CUDA)
    cuda::deallocate(device.index, ptr, stream);
#endif
    return;
  }
  std::free(ptr);
}

void stream_wait(const Device& device, void* producer, void* consumer) {
#if defined(BN_WITH_CUDA)
  if (device.kind == DeviceKind::cuda) cuda::stream_wait(device.index, producer, consumer);
#endif
}

}  // namespace batchnorm
