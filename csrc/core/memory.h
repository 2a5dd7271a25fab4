// Output memory for callers of the op layer (the Python binding, a C API): 64-byte aligned
// host memory on the CPU, the CUDA backend's stream-ordered pool on a GPU.
#pragma once
#include <cstddef>

#include "core/tensor.h"

namespace batchnorm {

// Host blocks of this size and more are kept for reuse when freed (see memory.cpp); smaller
// ones are plain 64-byte aligned allocations.
constexpr std::size_t kHostCachedMinBytes = std::size_t(1) << 20;

void* allocate(const Device& device, std::size_t bytes, void* stream = nullptr);
void deallocate(const Device& device, void* ptr, void* stream = nullptr);
// Frees the host blocks kept for reuse (see memory.cpp) and the unused memory of the CUDA
// pools; returns the bytes released.
std::size_t release_cached_memory();

// Makes `consumer` wait for the work enqueued so far on `producer` (CUDA; no-op on the CPU).
void stream_wait(const Device& device, void* producer, void* consumer);

}  // namespace batchnorm
