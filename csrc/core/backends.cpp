// The backend tables: the CPU backend always, the CUDA backend when the build has it (the one
// place in the core that asks BN_WITH_CUDA).
#include <string>

#include "core/backend.h"
#include "core/errors.h"

namespace batchnorm {

namespace {

void no_stream_wait(int, void*, void*) {}

// A GPU's ops only enqueue: the tasks are issued in order on the calling thread. (Only the
// CUDA table uses it: unused in CPU-only builds, where -Wunused-function had warned.)
[[maybe_unused]] void in_order(int64_t n, int64_t, void (*fn)(void*, int64_t), void* ctx) {
  for (int64_t i = 0; i < n; ++i) fn(ctx, i);
}

CudaInfo cpu_info() {
  CudaInfo ci;
  ci.reason = "built without the CUDA backend (no CUDA compiler at build time, or BATCHNORM_CUDA=OFF)";
  return ci;
}

}  // namespace

const Backend& cpu_backend() {
  static const Backend table{"cpu",
                             cpu::statistics,
                             cpu::forward_training,
                             cpu::forward_inference,
                             cpu::backward,
                             cpu::backward_reduce,
                             cpu::backward_elemt,
                             cpu::merge_statistics,
                             cpu::fold,
                             cpu::elementwise,
                             cpu::allocate,
                             cpu::deallocate,
                             cpu::release_cached,
                             no_stream_wait,
                             cpu_info,
                             cpu::for_each};
  return table;
}

const Backend* cuda_backend() {
#if defined(BN_WITH_CUDA)
  static const Backend table{"cuda",
                             cuda::statistics,
                             cuda::forward_training,
                             cuda::forward_inference,
                             cuda::backward,
                             cuda::backward_reduce,
                             cuda::backward_elemt,
                             cuda::merge_statistics,
                             cuda::fold,
                             cuda::elementwise,
                             cuda::allocate,
                             cuda::deallocate,
                             cuda::release_cached,
                             cuda::stream_wait,
                             cuda::info,
                             in_order};
  return &table;
#else
  return nullptr;
#endif
}

const Backend& backend_for(const Device& device) {
  if (device.kind != DeviceKind::cuda) return cpu_backend();
  const Backend* cuda = cuda_backend();
  BN_EXPECTS(cuda != nullptr, type_error, "an array is on ", device_name(device),
             " but this build of batchnorm has no CUDA backend (built without a CUDA compiler); "
             "pass a CPU array or rebuild with BATCHNORM_CUDA=ON");
  return *cuda;
}

}  // namespace batchnorm
