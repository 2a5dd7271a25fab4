// What every CUDA op needs around its kernels: errors as batchnorm::runtime_error naming the
// CUDA error and the call, the device guard, the caller's stream, the workspace from the
// stream-ordered pool, and the launch geometry that depends on the shape alone.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "core/errors.h"
#include "core/ops.h"

namespace batchnorm::cuda {

// Threads per block of every kernel: 8 warps; 8 such blocks fill an SM's 2048 threads.
constexpr int kBlock = 256;
// Blocks per reduction and per elementwise pass, about: two waves of 8 blocks on a 132-SM
// H100. A fixed number (not read off the device) keeps the reduction tree, hence the bits,
// the same on every GPU.
constexpr int64_t kTargetBlocks = 2048;
// Packs (channels-first) or positions (channels-last) each thread takes at least per item:
// fewer make the per-item block merge dominate. Measured on an H100 (bench notes in
// csrc/cuda/README.md): channels-last statistics of 128x56x56x64 float32 went from 0.143 to
// 0.076 ms with 32 instead of 8; channels-first did best with 8 (a 32x64x56x56 tensor
// needs the splits to fill the GPU).
constexpr int64_t kMinWork = 8;
constexpr int64_t kMinWorkChannelsLast = 32;

// Tuning overrides for measuring other plans (BATCHNORM_CUDA_ITEMS, BATCHNORM_CUDA_MIN_WORK,
// BATCHNORM_CUDA_MIN_WORK_CL): read once per process; results stay reproducible for a given
// setting, and bitwise equal to the defaults' only when the plan comes out the same.
inline int64_t env_tuning(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  const long long n = v ? std::atoll(v) : 0;
  return n > 0 ? n : fallback;
}
inline int64_t target_items() {
  static const int64_t v = env_tuning("BATCHNORM_CUDA_ITEMS", kTargetBlocks);
  return v;
}
inline int64_t min_work() {
  static const int64_t v = env_tuning("BATCHNORM_CUDA_MIN_WORK", kMinWork);
  return v;
}
inline int64_t min_work_channels_last() {
  static const int64_t v = env_tuning("BATCHNORM_CUDA_MIN_WORK_CL", kMinWorkChannelsLast);
  return v;
}

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line);

}  // namespace batchnorm::cuda

// Any CUDA error becomes a batchnorm::runtime_error (RuntimeError in Python) with the error's
// name, its description and the failing call.
#define BN_CUDA_CHECK(call)                                                           \
  do {                                                                                \
    const cudaError_t bn_err_ = (call);                                               \
    if (bn_err_ != cudaSuccess) ::batchnorm::cuda::throw_cuda_error(bn_err_, #call, __FILE__, __LINE__); \
  } while (0)

// After every kernel launch: launch-configuration errors surface here, not at a later call.
#define BN_CUDA_CHECK_LAUNCH(kernel)                                                    \
  do {                                                                                  \
    const cudaError_t bn_err_ = cudaGetLastError();                                     \
    if (bn_err_ != cudaSuccess)                                                         \
      ::batchnorm::cuda::throw_cuda_error(bn_err_, "launch of " kernel, __FILE__, __LINE__); \
  } while (0)

namespace batchnorm::cuda {

// Makes `device` current for the scope and restores the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    BN_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) BN_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// DLPack's stream numbers: 0 and 1 are the legacy default stream, 2 the per-thread default
// stream, anything else a cudaStream_t.
inline cudaStream_t to_stream(void* s) {
  const auto v = reinterpret_cast<uintptr_t>(s);
  if (v == 0 || v == 1) return cudaStreamLegacy;
  if (v == 2) return cudaStreamPerThread;
  return static_cast<cudaStream_t>(s);
}

// Device memory usable by work enqueued on `stream` from now on: the backend's stream-ordered
// pool, or cudaMalloc where the device has no memory pools. pool_free returns the error
// instead of throwing, for destructors.
void* pool_allocate(int device, size_t bytes, cudaStream_t stream);
cudaError_t pool_free(int device, void* ptr, cudaStream_t stream);

// Scratch memory of one op from the stream-ordered pool, handed back on the same stream once
// the op's launches are enqueued (or when a launch throws): never a cudaMalloc per call.
// With a framework's allocator (Exec::scratch, XLA's in an FFI call) the blocks come from it
// instead and the framework frees them.
class Workspace {
 public:
  Workspace(int device, cudaStream_t stream, const ScratchAllocator* scratch)
      : device_(device), stream_(stream), scratch_(scratch) {}
  ~Workspace() {
    // A failure here resurfaces at the next checked call; a destructor must not throw.
    for (int i = 0; i < used_; ++i) pool_free(device_, blocks_[i], stream_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // `count` objects of type U, usable by work enqueued on the stream from now on.
  template <class U>
  U* alloc(int64_t count) {
    BN_EXPECTS(used_ < kMaxBlocks, runtime_error, "internal error: too many workspace blocks");
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(U);
    if (scratch_) {
      void* block = scratch_->allocate(scratch_->context, bytes);
      BN_EXPECTS(block != nullptr, runtime_error, "out of scratch memory: the framework's allocator refused ", bytes,
                 " bytes");
      return static_cast<U*>(block);
    }
    blocks_[used_] = pool_allocate(device_, bytes, stream_);
    return static_cast<U*>(blocks_[used_++]);
  }

 private:
  static constexpr int kMaxBlocks = 4;
  int device_;
  cudaStream_t stream_;
  const ScratchAllocator* scratch_;
  int used_ = 0;
  void* blocks_[kMaxBlocks] = {};
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks to launch for `items` work items, each block looping over items with a grid stride.
inline unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::clamp<int64_t>(items, 1, INT_MAX));
}

}  // namespace batchnorm::cuda
