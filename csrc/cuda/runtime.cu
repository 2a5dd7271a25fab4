// The CUDA runtime glue of the backend: what info() reports (never throwing, also on a machine
// with no driver), errors as runtime_error, the stream-ordered memory pool behind allocate()
// and every workspace, and stream_wait for handing results to a consumer's stream.
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "core/backend.h"
#include "cuda/common.cuh"

namespace batchnorm::cuda {

void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  cudaGetLastError();  // clear a non-sticky error so it is not reported again by a later check
  const char* base = file;
  for (const char* p = file; *p; ++p)
    if (*p == '/' || *p == '\\') base = p + 1;
  throw runtime_error(detail::concat("CUDA error ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ") in ", call,
                                     " at ", base, ":", line));
}

namespace {

CudaInfo query_info() {
  CudaInfo ci;
  ci.compiled = true;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    int driver = 0;
    if (err == cudaErrorInsufficientDriver && cudaDriverGetVersion(&driver) == cudaSuccess && driver == 0) {
      ci.reason = "no CUDA driver found (libcuda could not be loaded)";
    } else {
      ci.reason = detail::concat(cudaGetErrorString(err), " (", cudaGetErrorName(err), ")");
    }
    cudaGetLastError();
    return ci;
  }
  if (count < 1) {
    ci.reason = "no CUDA device found";
    return ci;
  }
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, d) == cudaSuccess) {
      ci.devices.emplace_back(prop.name);
    } else {
      cudaGetLastError();
      ci.devices.emplace_back("unknown CUDA device");
    }
  }
  ci.available = true;
  return ci;
}

// The backend's own pool per device (the default pool is left to other libraries), with a
// release threshold of "never": freed blocks stay cached for the next call. Devices without
// memory pools (some virtualized setups) fall back to cudaMalloc / cudaFree.
struct DevicePool {
  bool ready = false;
  cudaMemPool_t pool = nullptr;  // null: no pools on this device
};

std::mutex& pools_mutex() {
  static std::mutex mutex;
  return mutex;
}
std::vector<DevicePool>& pools_list() {
  static std::vector<DevicePool> pools;
  return pools;
}

cudaMemPool_t device_pool(int device) {
  std::lock_guard<std::mutex> lock(pools_mutex());
  std::vector<DevicePool>& pools = pools_list();
  if (device < 0) throw runtime_error(detail::concat("invalid CUDA device index ", device));
  if (static_cast<size_t>(device) >= pools.size()) pools.resize(static_cast<size_t>(device) + 1);
  DevicePool& entry = pools[static_cast<size_t>(device)];
  if (entry.ready) return entry.pool;
  int supported = 0;
  BN_CUDA_CHECK(cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, device));
  if (supported) {
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool = nullptr;
    BN_CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
    uint64_t threshold = UINT64_MAX;
    const cudaError_t err = cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold);
    if (err != cudaSuccess) {
      cudaMemPoolDestroy(pool);
      throw_cuda_error(err, "cudaMemPoolSetAttribute(cudaMemPoolAttrReleaseThreshold)", __FILE__, __LINE__);
    }
    entry.pool = pool;
  }
  entry.ready = true;
  return entry.pool;
}

}  // namespace

CudaInfo info() {
  try {
    static const CudaInfo cached = query_info();  // the devices of a process do not change
    return cached;
  } catch (...) {  // never throws: info() is how callers learn that CUDA is unusable
    CudaInfo ci;
    ci.compiled = true;
    ci.reason = "querying the CUDA runtime failed";
    return ci;
  }
}

void* pool_allocate(int device, size_t bytes, cudaStream_t stream) {
  void* ptr = nullptr;
  const size_t size = bytes > 0 ? bytes : 1;
  if (cudaMemPool_t pool = device_pool(device))
    BN_CUDA_CHECK(cudaMallocFromPoolAsync(&ptr, size, pool, stream));
  else
    BN_CUDA_CHECK(cudaMalloc(&ptr, size));
  return ptr;
}

cudaError_t pool_free(int device, void* ptr, cudaStream_t stream) {
  try {
    return device_pool(device) ? cudaFreeAsync(ptr, stream) : cudaFree(ptr);  // cudaFree waits for the device
  } catch (const runtime_error&) {
    return cudaErrorInvalidValue;
  }
}

void* allocate(int device, size_t bytes, void* stream) {
  DeviceGuard guard(device);
  return pool_allocate(device, bytes, to_stream(stream));
}

void deallocate(int device, void* ptr, void* stream) {
  if (ptr == nullptr) return;
  DeviceGuard guard(device);
  BN_CUDA_CHECK(pool_free(device, ptr, to_stream(stream)));
}

size_t release_cached() {
  std::lock_guard<std::mutex> lock(pools_mutex());
  size_t released = 0;
  std::vector<DevicePool>& pools = pools_list();
  for (size_t d = 0; d < pools.size(); ++d) {
    if (!pools[d].ready || pools[d].pool == nullptr) continue;
    DeviceGuard guard(static_cast<int>(d));
    BN_CUDA_CHECK(cudaDeviceSynchronize());  // frees queued on streams take effect first
    uint64_t before = 0, after = 0;
    BN_CUDA_CHECK(cudaMemPoolGetAttribute(pools[d].pool, cudaMemPoolAttrReservedMemCurrent, &before));
    BN_CUDA_CHECK(cudaMemPoolTrimTo(pools[d].pool, 0));
    BN_CUDA_CHECK(cudaMemPoolGetAttribute(pools[d].pool, cudaMemPoolAttrReservedMemCurrent, &after));
    if (before > after) released += static_cast<size_t>(before - after);
  }
  return released;
}

void stream_wait(int device, void* producer, void* consumer) {
  const cudaStream_t from = to_stream(producer), to = to_stream(consumer);
  if (from == to) return;
  DeviceGuard guard(device);
  cudaEvent_t event = nullptr;
  BN_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  // Destroying a recorded event is safe: its resources go once the device has passed it.
  struct Destroy {
    cudaEvent_t e;
    ~Destroy() { cudaEventDestroy(e); }
  } destroy{event};
  BN_CUDA_CHECK(cudaEventRecord(event, from));
  BN_CUDA_CHECK(cudaStreamWaitEvent(to, event, 0));
}

}  // namespace batchnorm::cuda
